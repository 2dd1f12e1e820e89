"""Adapter for plain PyTorch ViTs built from ``nn.TransformerEncoderLayer``.

Such models carry no config, so what a ViT spec needs is read from the modules (the patch
convolution, the positional embedding, the head) or given as hints, and the number of prefix
tokens is measured by running the model once. The model cannot be rebuilt from a file: vitslim
never imports or executes code named in a file, so the user supplies the skeleton.
"""

from __future__ import annotations

import math

import torch
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
from vitslim.errors import VitslimError

FAMILY = "torch"


def matches(model: nn.Module) -> bool:
    return any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules())


def _encoder_layers(model: nn.Module) -> list[nn.TransformerEncoderLayer]:
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]


def _block(index: int, layer: nn.TransformerEncoderLayer) -> BlockSpec:
    attn = layer.self_attn
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


def resize_attention(attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
    raise VitslimError(
        f"a packed nn.MultiheadAttention cannot change its head width ({original_head_dim} to {head_dim}): it reads "
        "in_proj_weight directly and derives the width from embed_dim / num_heads"
    )


def channel_pruning_obstacles(block: BlockSpec) -> dict[str, str]:
    """None of the family's own: the packed attention's obstacle holds for any packed layout and is
    known from ``AttentionSpec.layout``; the MLP (linear1, activation, linear2) has no norm inside."""
    return {}


def pin_architecture(model: nn.Module) -> None:
    """Nothing to pin: ``architecture`` records only the class, which slicing channels keeps."""
