"""What the compression methods may know about a model, independent of the library it came from.

Each model family (timm, Hugging Face transformers, plain ``torch.nn``) has one adapter that
fills these records. The methods read them and never reach into a library's internals, so a new
family costs one adapter, not a change to every method. ``ModelFamily`` is what an adapter
provides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """How the model expects its images, in the vocabulary of ``timm.data.create_transform``."""

    input_size: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def as_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 0.875)),
            crop_mode=str(data.get("crop_mode", "center")),
        )


IMAGENET_PREPROCESSING = Preprocessing(
    input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


def is_linear(module: object) -> bool:
    """An ``nn.Linear`` or a drop-in replacement for one (a factorised layer keeps ``in_features``
    and ``out_features``), so compressed models still describe themselves."""
    return isinstance(module, nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features")


@dataclass
class AttentionSpec:
    """One self-attention layer. Exactly one of ``qkv``, ``q``/``k``/``v`` or ``packed`` is set.
    Projections are ``nn.Linear`` or linear-like replacements (see ``is_linear``)."""

    module: nn.Module
    out_proj: nn.Module
    num_heads: int
    head_dim: int
    qkv: nn.Module | None = None  # fused projection, output laid out as [q | k | v]
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    packed: nn.MultiheadAttention | None = None  # in_proj_weight/in_proj_bias, not an nn.Linear (until unpack_attention)

    def __post_init__(self) -> None:
        layouts = [self.qkv is not None, self.q is not None, self.packed is not None]
        if sum(layouts) != 1 or (self.q is not None and (self.k is None or self.v is None)):
            raise ValueError("AttentionSpec needs exactly one of qkv, q/k/v or packed")

    @property
    def layout(self) -> str:
        return "qkv" if self.qkv is not None else ("separate" if self.q is not None else "packed")


@dataclass
class MlpSpec:
    fc1: nn.Module
    fc2: nn.Module


@dataclass
class BlockSpec:
    index: int
    module: nn.Module
    attention: AttentionSpec
    mlp: MlpSpec


@dataclass
class ViTSpec:
    """Everything the methods need to know about a ViT, and nothing more.

    ``linears()`` names every compressible ``nn.Linear`` by its qualified name in ``model``; the
    patch embedding and the classifier head are deliberately not in it.
    """

    family: str  # "timm", "hf" or "torch"
    model: nn.Module
    blocks: list[BlockSpec]
    num_prefix_tokens: int  # class + distillation + register tokens, all before the patch tokens
    grid_size: tuple[int, int]  # patch grid (rows, cols)
    patch_size: tuple[int, int]
    preprocessing: Preprocessing
    embed_dim: int
    num_classes: int
    label_names: list[str] | None = None
    prefix_kinds: dict[str, int] = field(default_factory=dict)  # e.g. {"class": 1, "register": 4}
    batch_first: bool = True  # blocks take (batch, tokens, dim); torch.nn encoders may take (tokens, batch, dim)
    root: nn.Module | None = None  # the user's model holding this ViT (None: the ViT is the whole model)
    path: str = ""  # qualified name of the ViT inside ``root``

    @property
    def whole(self) -> nn.Module:
        """The model whose output the methods preserve: the user's model around the ViT, or the ViT."""
        return self.model if self.root is None else self.root

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def linears(self) -> dict[str, nn.Linear]:
        """Still-dense linears by qualified name (attention projections and MLP), in block order:
        the ones a compression method may still replace."""
        by_id = {id(m): name for name, m in self.whole.named_modules()}
        found: dict[str, nn.Linear] = {}
        for block in self.blocks:
            attn = block.attention
            for layer in (attn.qkv, attn.q, attn.k, attn.v, attn.out_proj, block.mlp.fc1, block.mlp.fc2):
                if isinstance(layer, nn.Linear):
                    found[by_id[id(layer)]] = layer
        return found

    def output(self, images: torch.Tensor) -> torch.Tensor:
        """The whole model's output for a batch of preprocessed images (class logits, a dense map,
        features), whatever form the family or the user's model returns it in."""
        return primary_output(self.whole(images))


def primary_output(output) -> torch.Tensor:
    """The one tensor a model's forward is about: itself, an HF output's ``logits`` (classifiers)
    or ``last_hidden_state`` (feature models), the first of a tuple, or a dict's "logits"/"out"
    (torchvision's segmentation models return ``{"out": ...}``)."""
    if isinstance(output, torch.Tensor):
        return output
    found = None
    if isinstance(output, dict):  # transformers' ModelOutput is a dict too, holding only the fields that are set
        found = next((output[key] for key in ("logits", "last_hidden_state", "out") if output.get(key) is not None), None)
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    if not isinstance(found, torch.Tensor):
        raise TypeError(f"cannot find the output tensor in a {type(output).__name__} returned by the model; "
                        "return a tensor, a tuple led by one, or a dict with 'logits' or 'out'")
    return found


# A loaded model carries its preprocessing in this plain attribute (not a buffer, not in the
# state dict), so that describe() knows it for families whose modules do not (HF, torch.nn).
PREPROCESSING_ATTR = "vitslim_preprocessing"


def add_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive attention bias on top of whatever mask the caller already passed (a boolean
    mask means "may attend", as in ``scaled_dot_product_attention``)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf"))
    return mask + bias


def replaceable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` that a replacement layer (factorised, int8) may take, by
    qualified name, a module shared under several names under each of them.

    ``nn.MultiheadAttention`` reads its ``out_proj.weight`` directly instead of calling the
    module, so a replacement there would be ignored: that projection stays dense. This holds for
    any model, so it also covers modules of no family vitslim knows.
    """
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if name and isinstance(module, nn.Linear) and id(module) not in read_directly}


@runtime_checkable
class ModelFamily(Protocol):
    """What the adapter of one model family provides; each adapter is a module
    (``adapters.timm_vit``, ``adapters.hf``, ``adapters.torch_nn``) with these members.

    A capability a family lacks is still a member, implemented to say so (nothing to prepare, no
    obstacles, or a ``VitslimError`` naming the reason), so callers call it instead of probing the
    adapter with ``hasattr``.
    """

    FAMILY: str  # the name a recipe records ("timm", "hf", "torch")

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family; never imports an optional library."""

    def describe(self, model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
        """The ``ViTSpec`` of ``model``; ``hints`` (torch.nn: input_size, ...) fill in what the model cannot tell."""

    def architecture(self, model: nn.Module) -> dict:
        """A JSON record of ``model``'s shape that ``build`` turns back into a model."""

    def build(self, architecture: dict) -> nn.Module:
        """An untrained model of the recorded shape, or a ``VitslimError`` saying why it cannot be built."""

    def replaceable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The Linears a replacement layer may take, by qualified name (see ``base.replaceable_linears``)."""

    def prepare_for_replacement(self, model: nn.Module) -> None:
        """Make ``model`` (or one part of it) call the modules that replace its Linears: switch
        off any fused path that reads their weights directly."""

    def unpack_attention(self, model: nn.Module, record: bool = True) -> list[str]:
        """Give every attention layer of ``model`` (or of one part of it) its projections as Linear
        modules that it calls, so methods can factorise, gate, slice and quantise them; return the
        qualified names of the attention modules it changed (empty: nothing to do, as for families
        whose attention already calls its Linears). A change of the model's structure is recorded
        as a recipe step with ``record``."""

    def add_attention_bias(self, attention: AttentionSpec, args: tuple, kwargs: dict,
                           bias: torch.Tensor) -> tuple[tuple, dict]:
        """The attention module's call arguments with an additive attention ``bias`` (token merging) in them."""

    def resize_attention(self, attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
        """Make the attention module compute with ``head_dim`` channels per head after its projections were cut."""

    def channel_pruning_obstacles(self, block: BlockSpec) -> dict[str, str]:
        """Why pruning channels of a part ("attention", "mlp") of ``block`` would change what it
        computes, for reasons only this family knows; empty when none."""

    def pin_architecture(self, model: nn.Module) -> None:
        """Fix ``architecture(model)`` before channel slicing changes the module widths it may read."""

    def output_reads_patch_tokens(self, model: nn.Module) -> bool:
        """Whether the model's output depends on its patch tokens (pooling over them, or returning
        them), so token merging must restore the full token map (dense mode) before the tokens
        leave the ViT. Only a head that reads the prefix tokens alone (a class-token classifier)
        can take the merged sequence as it is; when a family cannot tell, it answers True, which
        is always correct, merely slower."""
