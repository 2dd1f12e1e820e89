"""Adapter for plain PyTorch ViTs built from ``nn.TransformerEncoderLayer``.

Such models carry no config, so what a ViT spec needs is read from the modules (the patch
convolution, the positional embedding, the head) or given as hints, and the number of prefix
tokens is measured by running the model once. The model cannot be rebuilt from a file: vitslim
never imports or executes code named in a file, so the user supplies the skeleton.

``nn.MultiheadAttention`` keeps its query/key/value projection as one packed parameter and reads
it, and ``out_proj.weight``, directly, so no module of it can be replaced, gated or sliced. A method
that compresses attention first calls ``unpack_attention``, which puts an
``UnpackedMultiheadAttention`` in its place: the same function, with ``qkv`` and ``out_proj`` as
Linear modules that it calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.adapters.base import (
    IMAGENET_PREPROCESSING,
    PREPROCESSING_ATTR,
    AttentionSpec,
    BlockSpec,
    MlpSpec,
    Preprocessing,
    ViTSpec,
    add_bias,
    is_linear,
)

# the rule shared by all families (keeps nn.MultiheadAttention.out_proj dense), as this family's protocol member
from vitslim.adapters.base import replaceable_linears as replaceable_linears
from vitslim.adapters.replacement import replacing_modules
from vitslim.errors import VitslimError
from vitslim.io.recipe import record_step, register_step

FAMILY = "torch"
UNPACK_STEP = "unpacked_attention"


def matches(model: nn.Module) -> bool:
    return any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules())


def _encoder_layers(model: nn.Module) -> list[nn.TransformerEncoderLayer]:
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]


class UnpackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention with its packed projection as a module: ``qkv`` (an
    ``nn.Linear`` whose output is laid out [q | k | v], head after head, as ``in_proj_weight`` is)
    and ``out_proj`` (the original module), both *called*, so a factorised, gated, sliced or int8
    layer put in their place takes effect, as in timm's attention. Attention itself is
    ``F.scaled_dot_product_attention``, whose scale follows the query width, so a sliced head
    width (``head_dim``) needs nothing else.

    Why a replacement module rather than hooks or parametrizations on the original: the
    original computes through ``F.multi_head_attention_forward`` from ``in_proj_weight``, so a hook
    cannot change which weights it multiplies, and a parametrization can only hand it a full
    (materialised) matrix of the original shape, which neither saves the low-rank FLOPs nor lets
    CDCP narrow the heads. Only the attention computation is written here (projections, SDPA,
    merge of heads); ``nn.TransformerEncoderLayer`` keeps its own forward, norms and MLP. Cost:
    the layer's fused C++ path (``torch._transformer_encoder_layer_fwd``) no longer applies to
    the block, which it did not anyway once any Linear of the block was replaced
    (``prepare_for_replacement``); SDPA keeps the fused attention kernel.

    It serves ``nn.TransformerEncoderLayer``'s call: self-attention (query, key and value the same
    tensor), ``need_weights=False``, an optional float or boolean ``attn_mask`` of shape (L, S) or
    (batch·heads, L, S) and ``key_padding_mask`` of shape (batch, S), boolean meaning "ignore", as
    ``nn.MultiheadAttention`` takes them. Anything else is refused rather than computed
    differently.
    """

    # nn.TransformerEncoderLayer's (and nn.TransformerEncoder's) fused-path check reads its
    # attention's in_proj_bias; None (no packed bias) sends it down the path that calls this module.
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise VitslimError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_packed(cls, packed: nn.MultiheadAttention) -> UnpackedMultiheadAttention:
        """The same attention as ``packed``, sharing its ``out_proj`` module and holding a copy of
        its packed weight and bias in ``qkv``."""
        weight = packed.in_proj_weight
        unpacked = cls(packed.embed_dim, packed.num_heads, bias=packed.in_proj_bias is not None, dropout=packed.dropout,
                       batch_first=packed.batch_first, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            unpacked.qkv.weight.copy_(weight)
            if packed.in_proj_bias is not None:
                unpacked.qkv.bias.copy_(packed.in_proj_bias)
        unpacked.qkv.requires_grad_(weight.requires_grad)
        unpacked.out_proj = packed.out_proj
        return unpacked.train(packed.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention.forward``'s signature; ``average_attn_weights`` has no effect,
        since no weights are returned."""
        if key is not query or value is not query:
            raise VitslimError("an unpacked attention computes self-attention only: query, key and value must be one tensor")
        if need_weights:
            raise VitslimError("an unpacked attention returns no attention weights (scaled_dot_product_attention computes "
                               "none); call it with need_weights=False, as nn.TransformerEncoderLayer does")
        # the projections see the caller's layout, as in nn.MultiheadAttention (token merging reads the keys there)
        qkv = self.qkv(query)
        if not self.batch_first:
            qkv = qkv.transpose(0, 1)
        batch, tokens = qkv.shape[:2]
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, tokens, q.dtype)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=is_causal and mask is None)
        merged = heads.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.out_proj(merged if self.batch_first else merged.transpose(0, 1)), None

    def _additive_mask(self, attn_mask, key_padding_mask, batch: int, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The masks as one additive (batch, heads or 1, L, S) bias, from ``nn.MultiheadAttention``'s forms."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise VitslimError(f"attn_mask must be (L, S) or (batch*heads, L, S), got shape {tuple(attn_mask.shape)}")
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:
                mask = mask.reshape(batch, self.num_heads, tokens, tokens)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, tokens)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``nn.MultiheadAttention``'s mask as an additive bias: a boolean True means "may not attend"."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _why_packed(attn: nn.MultiheadAttention) -> str | None:
    """Why ``attn`` cannot be unpacked exactly; None when it can."""
    if not attn._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "add_bias_kv or add_zero_attn extends the keys and values"
    return None


def _block(index: int, layer: nn.TransformerEncoderLayer) -> BlockSpec:
    attn = layer.self_attn
    if isinstance(attn, UnpackedMultiheadAttention):
        attention = AttentionSpec(module=attn, out_proj=attn.out_proj, num_heads=attn.num_heads, head_dim=attn.head_dim, qkv=attn.qkv)
        return BlockSpec(index, layer, attention, MlpSpec(fc1=layer.linear1, fc2=layer.linear2))
    if not attn._qkv_same_embed_dim:
        raise VitslimError(
            f"encoder layer {index}: nn.MultiheadAttention with kdim/vdim different from embed_dim (separate "
            "q/k/v weights) is unsupported; build the attention with kdim = vdim = embed_dim"
        )
    attention = AttentionSpec(
        module=attn, out_proj=attn.out_proj, num_heads=attn.num_heads, head_dim=attn.head_dim, packed=attn
    )
    return BlockSpec(index, layer, attention, MlpSpec(fc1=layer.linear1, fc2=layer.linear2))


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise VitslimError(f"{name}={value!r}: give an int or a (height, width) pair")
    return int(value[0]), int(value[1])


def _patch_conv(model: nn.Module) -> nn.Conv2d | None:
    """The patch embedding: the first convolution that cuts the image into non-overlapping tiles."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride):
            return m
    return None


def _patch_size(conv: nn.Conv2d | None, hint) -> tuple[int, int]:
    if hint is None:
        if conv is None:
            raise VitslimError(
                "cannot find the patch embedding (an nn.Conv2d with kernel_size == stride); pass patch_size= to describe()"
            )
        return tuple(conv.kernel_size)
    patch = _pair(hint, "patch_size")
    if conv is not None and patch != tuple(conv.kernel_size):
        raise VitslimError(f"patch_size={hint} contradicts the model's patch convolution, whose kernel is {tuple(conv.kernel_size)}")
    return patch


def _size_from_pos_embed(model: nn.Module, embed_dim: int, patch: tuple[int, int]) -> tuple[int, int] | None:
    """Read the trained resolution off a (1, tokens, dim) positional embedding.

    The (1, 1, dim) parameters are taken to be prefix tokens; whether the positional embedding
    covers them or only the patches, the patch grid is the square count that remains.
    """
    params = [p for p in model.parameters() if p.dim() == 3 and p.shape[0] == 1 and p.shape[2] == embed_dim]
    prefix = sum(1 for p in params if p.shape[1] == 1)
    for pos in (p for p in params if p.shape[1] > 1):
        for tokens in (pos.shape[1] - prefix, pos.shape[1]):
            side = math.isqrt(tokens)
            if tokens > 0 and side * side == tokens:
                return side * patch[0], side * patch[1]
    return None


def _input_size(model, hint, known: Preprocessing | None, embed_dim: int, patch: tuple[int, int]) -> tuple[int, int]:
    """Precedence: the input_size hint, the preprocessing's size, the positional embedding."""
    if hint is not None:
        size = _pair(hint, "input_size")
        if known is not None and tuple(known.input_size[1:]) != size:
            raise VitslimError(f"input_size={hint} contradicts the preprocessing, whose input size is {known.input_size[1:]}")
        return size
    if known is not None:
        return tuple(known.input_size[1:])
    size = _size_from_pos_embed(model, embed_dim, patch)
    if size is None:
        raise VitslimError(
            "cannot tell the model's input resolution (no (1, N, dim) positional embedding with a square patch grid); "
            "pass input_size= to describe()"
        )
    return size


class _Probed(Exception):
    """Raised from the probe hook to stop the forward pass once the sequence length is known."""


def _sequence_length(model: nn.Module, layer: nn.TransformerEncoderLayer, image: torch.Tensor) -> int:
    """Run ``model`` on ``image`` up to ``layer`` and return the length of the token sequence it gets."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        src = args[0] if args else kwargs["src"]
        seen.append(src.shape[1 if module.self_attn.batch_first else 0])
        raise _Probed

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    modes = [(m, m.training) for m in model.modules()]  # per module: some may be frozen in eval on purpose
    model.eval()  # a probe must not update batch-norm statistics or draw dropout masks
    try:
        with torch.no_grad():
            model(image)
    except _Probed:
        pass
    except Exception as error:  # any failure of user code on this input means the size is wrong
        raise VitslimError(
            f"the model fails on a {image.shape[2]}x{image.shape[3]} image ({type(error).__name__}: {error}); "
            "pass the input_size= the model was built for"
        ) from None
    finally:
        handle.remove()
        for module, training in modes:
            module.training = training
    if not seen:
        raise VitslimError("the model's forward pass never reaches its first nn.TransformerEncoderLayer; vitslim cannot describe it")
    return seen[0]


def describe(
    model: nn.Module,
    preprocessing: Preprocessing | None = None,
    *,
    input_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
) -> ViTSpec:
    layers = _encoder_layers(model)
    if not layers:
        raise VitslimError(f"{type(model).__name__} contains no nn.TransformerEncoderLayer")
    blocks = [_block(i, layer) for i, layer in enumerate(layers)]
    embed_dim = int(layers[0].self_attn.embed_dim)
    conv = _patch_conv(model)
    patch = _patch_size(conv, patch_size)
    known = preprocessing or getattr(model, PREPROCESSING_ATTR, None)
    size = _input_size(model, input_size, known, embed_dim, patch)
    channels = known.input_size[0] if known is not None else (conv.in_channels if conv is not None else 3)
    grid = (size[0] // patch[0], size[1] // patch[1])
    weight = next(p for p in model.parameters() if p.is_floating_point())
    tokens = _sequence_length(model, layers[0], torch.zeros(1, channels, *size, dtype=weight.dtype, device=weight.device))
    prefix = tokens - grid[0] * grid[1]
    if prefix < 0:
        raise VitslimError(
            f"the encoder sees {tokens} tokens, fewer than the {grid[0]}x{grid[1]} patch grid of a {size[0]}x{size[1]} image "
            f"with {patch[0]}x{patch[1]} patches; check input_size= and patch_size="
        )
    if num_prefix_tokens is not None and num_prefix_tokens != prefix:
        raise VitslimError(
            f"num_prefix_tokens={num_prefix_tokens} but the encoder sees {tokens} tokens for a {grid[0]}x{grid[1]} grid, "
            f"so {prefix} prefix tokens"
        )
    return ViTSpec(
        family=FAMILY,
        model=model,
        blocks=blocks,
        num_prefix_tokens=prefix,
        grid_size=grid,
        patch_size=patch,
        preprocessing=known or _default_preprocessing(channels, size),
        embed_dim=embed_dim,
        num_classes=_head(model, layers).out_features,
        prefix_kinds={"class": prefix} if prefix else {},
        batch_first=bool(layers[0].self_attn.batch_first),
    )


def _default_preprocessing(channels: int, size: tuple[int, int]) -> Preprocessing:
    base = IMAGENET_PREPROCESSING
    if channels != base.input_size[0]:
        raise VitslimError(f"the model takes {channels}-channel images; pass a Preprocessing with its mean and std")
    return Preprocessing(
        input_size=(channels, *size), mean=base.mean, std=base.std, interpolation=base.interpolation, crop_pct=base.crop_pct
    )


def _head(model: nn.Module, layers: list[nn.TransformerEncoderLayer]) -> nn.Linear:
    """The classifier: the last Linear (or linear-like replacement) outside the encoder layers."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    outside = [m for m in model.modules() if is_linear(m) and id(m) not in inside]
    if not outside:
        raise VitslimError("found no classifier head (an nn.Linear after the encoder); vitslim needs class logits")
    return outside[-1]


def output_reads_patch_tokens(model: nn.Module) -> bool:
    """Whether the model's output depends on its patch tokens, so token merging must restore the
    full token map (dense mode) before the tokens leave the ViT.

    A plain model's forward is the user's code (a class-token head, mean pooling, a dense
    decoder), so this is measured, not read: the patch tokens the last encoder layer returns are
    replaced by noise, and only an output left exactly as it was shows that the head reads the
    prefix tokens alone. Whenever that cannot be measured (describe() cannot tell the input size,
    the forward pass fails), the answer is True: always correct, merely slower.
    """
    try:
        spec = describe(model)
    except VitslimError:
        return True
    weight = next(p for p in model.parameters() if p.is_floating_point())
    image = torch.zeros(1, *spec.preprocessing.input_size, dtype=weight.dtype, device=weight.device)
    token_dim = 1 if spec.batch_first else 0
    prefix = spec.num_prefix_tokens
    generator = torch.Generator(device=weight.device).manual_seed(0)  # leaves the user's random state alone

    def scramble_patches(module, args, output):
        patches = output.narrow(token_dim, prefix, output.shape[token_dim] - prefix)
        noise = torch.randn(patches.shape, generator=generator, dtype=patches.dtype, device=patches.device)
        return torch.cat([output.narrow(token_dim, 0, prefix), patches + noise], dim=token_dim)

    modes = [(m, m.training) for m in model.modules()]  # per module: some may be frozen in eval on purpose
    model.eval()  # a probe must not update batch-norm statistics or draw dropout masks
    try:
        with torch.no_grad():
            original = _tensors_in(model(image))
            handle = spec.blocks[-1].module.register_forward_hook(scramble_patches)
            try:
                scrambled = _tensors_in(model(image))
            finally:
                handle.remove()
    except Exception:  # the user's forward pass failed: nothing measured, so the safe answer
        return True
    finally:
        for module, training in modes:
            module.training = training
    unchanged = bool(original) and len(original) == len(scrambled) and all(map(torch.equal, original, scrambled))
    return not unchanged


def _tensors_in(output) -> list[torch.Tensor]:
    """Every tensor in what a forward pass returned (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors_in(item)]
    return []


def architecture(model: nn.Module) -> dict:
    """Informational only: the class is recorded, never imported back."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build(architecture: dict) -> nn.Module:
    raise VitslimError(
        f"a plain PyTorch model ({architecture.get('class', 'unknown class')}) cannot be rebuilt from a file without its "
        "code; construct it in Python and pass it as vitslim.load_model(folder, skeleton=MyViT(...))"
    )


def prepare_for_replacement(model: nn.Module) -> None:
    """Let compression methods swap the encoder layers' Linears for other modules.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``'s nested-tensor
    path) may run a fused kernel that reads ``linear1.weight`` and friends directly instead of
    calling the modules. ``activation_relu_or_gelu`` only selects that kernel; with it cleared the
    layer computes the same function through its child modules, so replacements take effect.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def add_attention_bias(attention: AttentionSpec, args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """``nn.MultiheadAttention`` takes a float ``attn_mask`` of shape (batch·heads, L, S); the
    encoder layer passes it by keyword."""
    batch, _, _, keys = bias.shape
    expanded = bias.expand(batch, attention.num_heads, keys, keys).reshape(batch * attention.num_heads, keys, keys)
    return args, {**kwargs, "attn_mask": add_bias(kwargs.get("attn_mask"), expanded)}


def unpack_attention(model: nn.Module, record: bool = True) -> list[str]:
    """Put an ``UnpackedMultiheadAttention`` in place of every encoder layer's packed
    ``nn.MultiheadAttention`` in ``model`` (a whole model, or one part of it), so methods can
    replace, gate and slice its projections; return the qualified names of the attentions it
    unpacked (none when all are unpacked already).

    The state dict changes (``in_proj_weight`` becomes ``qkv.weight``), so with ``record`` the
    change is a recipe step, replayed on reload in the order it was recorded. Hooks a registered
    owner keeps on the model (token merging's) move to the unpacked attention; any other hook on an
    attention is refused, since it would stay on the module this replaces. One that cannot be
    unpacked exactly (add_bias_kv, add_zero_attn) stays packed, and dense.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.TransformerEncoderLayer)]
    unpacked = []
    with replacing_modules(model):
        for name, layer in layers:
            attn = layer.self_attn
            if not isinstance(attn, nn.MultiheadAttention) or _why_packed(attn) is not None:
                continue
            qualified = f"{name}.self_attn" if name else "self_attn"
            if attn._forward_hooks or attn._forward_pre_hooks:
                raise VitslimError(f"{qualified} carries forward hooks that vitslim does not own, which would be lost when it is "
                                   "unpacked; remove them before compressing its attention")
            layer.self_attn = UnpackedMultiheadAttention.from_packed(attn)
            unpacked.append(qualified)
    if unpacked:
        prepare_for_replacement(model)
        if record:
            record_step(model, {"method": UNPACK_STEP, "modules": unpacked})
    return unpacked


@register_step(UNPACK_STEP, summary=lambda step: f"attention projections unpacked ({len(step.get('modules', []))} layers)")
def _replay_unpacking(model: nn.Module, step: dict) -> None:
    """Recipe replay: unpack the same attentions (their weights are loaded after)."""
    unpacked = unpack_attention(model, record=False)
    if unpacked != list(step.get("modules", [])):
        raise VitslimError(f"the recipe unpacks the attention of {step.get('modules')}, but the model has packed attention at "
                           f"{unpacked}; load it into a skeleton of the class it was saved from")


def resize_attention(attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
    """Set an unpacked attention's per-head width after its projections were cut to ``head_dim``
    (SDPA scales by the query width by itself). A packed one reads ``in_proj_weight`` directly
    and derives the width from embed_dim / num_heads, so it must be unpacked first."""
    attn = attention.module
    if not isinstance(attn, UnpackedMultiheadAttention):
        raise VitslimError(
            f"a packed nn.MultiheadAttention cannot change its head width ({original_head_dim} to {head_dim}): it reads "
            "in_proj_weight directly and derives the width from embed_dim / num_heads; unpack_attention first"
        )
    if attn.head_dim != original_head_dim:
        raise VitslimError(f"the attention has head width {attn.head_dim}, not the {original_head_dim} expected; the model and its recipe disagree")
    attn.head_dim = head_dim


def channel_pruning_obstacles(block: BlockSpec) -> dict[str, str]:
    """None of the family's own: the packed attention's obstacle holds for any packed layout and is
    known from ``AttentionSpec.layout``; the MLP (linear1, activation, linear2) has no norm inside."""
    return {}


def pin_architecture(model: nn.Module) -> None:
    """Nothing to pin: ``architecture`` records only the class, which slicing channels keeps."""
