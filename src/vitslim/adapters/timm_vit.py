"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, distilled DeiT, DeiT-III, registers).

Reads only public structure: ``blocks[i].attn.qkv/proj``, ``blocks[i].mlp.fc1/fc2``,
``num_prefix_tokens``, ``patch_embed`` and ``pretrained_cfg``.
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.adapters.base import (
    PREPROCESSING_ATTR,
    AttentionSpec,
    BlockSpec,
    MlpSpec,
    Preprocessing,
    ViTSpec,
    add_bias,
    is_linear,
)

# the rule shared by all families (timm's modules call every Linear they hold), as this family's protocol member
from vitslim.adapters.base import replaceable_linears as replaceable_linears
from vitslim.errors import VitslimError

FAMILY = "timm"
# Set by the loader when it knows exactly how timm built the model (config.json's model_args);
# otherwise architecture() reads the arguments back from the module structure.
TIMM_CONFIG_ATTR = "vitslim_timm_config"


def matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _attention(attn: nn.Module, where: str) -> AttentionSpec:
    proj = getattr(attn, "proj", None)
    if not is_linear(proj):
        raise VitslimError(f"{where}: timm attention {type(attn).__name__} has no Linear 'proj'; this variant is not supported")
    common = dict(module=attn, out_proj=proj, num_heads=attn.num_heads, head_dim=attn.head_dim)
    if is_linear(getattr(attn, "qkv", None)):
        return AttentionSpec(qkv=attn.qkv, **common)
    for names in (("q", "k", "v"), ("q_proj", "k_proj", "v_proj")):
        layers = [getattr(attn, n, None) for n in names]
        if all(is_linear(layer) for layer in layers):
            return AttentionSpec(q=layers[0], k=layers[1], v=layers[2], **common)
    raise VitslimError(f"{where}: timm attention {type(attn).__name__} has neither qkv nor q/k/v Linears; not supported")


def _mlp(mlp: nn.Module, where: str) -> MlpSpec:
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (is_linear(fc1) and is_linear(fc2)):
        raise VitslimError(f"{where}: timm MLP {type(mlp).__name__} is not a plain fc1/fc2 MLP (gated MLPs are not supported yet)")
    return MlpSpec(fc1=fc1, fc2=fc2)


def default_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # timm keeps the pretrained tag's input size even when the model was built with another
    # img_size; the size the patch embedding was built for is the one the model accepts.
    built = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    input_size = cfg.get("input_size") if getattr(model, "dynamic_img_size", False) and cfg.get("input_size") else built
    return Preprocessing(
        input_size=tuple(int(v) for v in input_size),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=cfg.get("crop_mode", "center"),
    )


def describe(model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
    if hints:
        raise VitslimError(f"timm models describe themselves; unexpected hints {sorted(hints)}")
    blocks = []
    for index, block in enumerate(model.blocks):
        where = f"blocks.{index}"
        blocks.append(BlockSpec(index, block, _attention(block.attn, where), _mlp(block.mlp, where)))
    prefix = int(model.num_prefix_tokens)
    registers = int(getattr(model, "num_reg_tokens", 0))
    kinds = {"class": int(model.has_class_token), "distillation": prefix - registers - int(model.has_class_token), "register": registers}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return ViTSpec(
        family=FAMILY,
        model=model,
        blocks=blocks,
        num_prefix_tokens=prefix,
        grid_size=tuple(model.patch_embed.grid_size),
        patch_size=tuple(model.patch_embed.patch_size),
        preprocessing=preprocessing or getattr(model, PREPROCESSING_ATTR, None) or default_preprocessing(model),
        embed_dim=int(model.embed_dim),
        num_classes=int(model.num_classes),
        label_names=list(cfg["label_names"]) if cfg.get("label_names") else None,
        prefix_kinds={k: v for k, v in kinds.items() if v},
    )


def output_reads_patch_tokens(model: nn.Module) -> bool:
    """Whether the model's output depends on its patch tokens, so token merging must restore the
    full token map (dense mode) before the tokens leave the ViT.

    timm pools by ``global_pool``: "token" reads the class token alone; "avg", "avgmax", "max",
    the attention poolings "map" and "prr", and "" (no pooling: every token is returned) read the
    patch tokens. A feature extractor (``num_classes=0``) returns the pooled features, so the
    answer is the same for it."""
    return model.global_pool != "token"


def _has_bias(layer: nn.Module) -> bool:
    return getattr(layer, "bias", None) is not None or getattr(getattr(layer, "up", None), "bias", None) is not None


def _read_model_args(model: nn.Module) -> dict:
    """timm keeps no record of its constructor arguments; read back the ones that shape the weights."""
    block = model.blocks[0]
    attn = block.attn
    args = {
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": _has_bias(attn.qkv) if hasattr(attn, "qkv") else True,
        "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "init_values": 1.0 if not isinstance(block.ls1, nn.Identity) else None,
        "class_token": bool(model.has_class_token),
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(model.no_embed_class),
        "global_pool": model.global_pool,
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if model.pos_embed is None:
        args["pos_embed"] = "none"
    return args


def architecture(model: nn.Module) -> dict:
    known = getattr(model, TIMM_CONFIG_ATTR, None)
    if known is not None:
        return dict(known)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    name = cfg.get("architecture")
    if not name:
        raise VitslimError("this timm model does not name its architecture (pretrained_cfg['architecture']); create it with timm.create_model")
    return {"architecture": name, "num_classes": int(model.num_classes), "model_args": _read_model_args(model)}


def is_architecture(name: object) -> bool:
    """Whether timm registers ``name`` (optionally with a pretrained tag). A name read from a
    file must pass this before it reaches ``timm.create_model``, which would otherwise try to
    parse it as a hub or local-dir reference and fail with a traceback far from the cause."""
    import timm

    return isinstance(name, str) and timm.is_model(name)


def build(record: dict) -> nn.Module:
    import timm

    name = record.get("architecture") if isinstance(record, dict) else None
    if not is_architecture(name):
        raise VitslimError(
            f"the recipe names timm architecture {name!r}, which timm {timm.__version__} does not know: the vitslim folder is "
            "corrupt, or was written with a newer timm (upgrade timm to load it)"
        )
    model = timm.create_model(name, pretrained=False, num_classes=record["num_classes"], **record.get("model_args", {}))
    setattr(model, TIMM_CONFIG_ATTR, dict(record))
    return model.eval()


def prepare_for_replacement(model: nn.Module) -> None:
    """Nothing to switch off: timm's blocks always call their Linear modules."""


def unpack_attention(model: nn.Module, record: bool = True) -> list[str]:
    """Nothing to unpack: timm's attention calls its qkv and proj Linears."""
    return []


def add_attention_bias(attention: AttentionSpec, args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """timm's ``Attention.forward(x, attn_mask=None, ...)`` hands ``attn_mask`` to
    ``scaled_dot_product_attention`` as an additive mask; ``Block`` passes it by keyword."""
    if len(args) > 1:
        return (args[0], add_bias(args[1], bias), *args[2:]), kwargs
    return args, {**kwargs, "attn_mask": add_bias(kwargs.get("attn_mask"), bias)}


def resize_attention(attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
    """Set a timm ``Attention``'s per-head width after its projections were cut to ``head_dim``:
    its forward reshapes q, k, v by ``head_dim`` and ``attn_dim`` and scales logits by ``scale``
    (the fused path lets SDPA derive the same scale from q's width)."""
    attn = attention.module
    if attn.head_dim != original_head_dim:
        raise VitslimError(f"timm attention has head width {attn.head_dim}, not the {original_head_dim} expected; the model and its recipe disagree")
    attn.head_dim = head_dim
    attn.attn_dim = attn.num_heads * head_dim
    attn.scale = head_dim**-0.5


def channel_pruning_obstacles(block: BlockSpec) -> dict[str, str]:
    """Why masking and slicing channels would change what a block computes, by part ("attention",
    "mlp"): a norm over the head width or the hidden units sees every channel, pruned or not."""
    from timm.models.vision_transformer import Attention

    found = {}
    attn = block.attention.module
    if type(attn) is not Attention:
        found["attention"] = f"{type(attn).__name__} is not timm's Attention, whose head width vitslim knows how to change"
    elif not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        found["attention"] = "q/k norm normalises over the whole head width"
    elif not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        found["attention"] = "the attention output norm (scale_norm) normalises over all heads' channels"
    elif getattr(attn, "gate", None) is not None:
        found["attention"] = "the gated attention output has its own projection over all heads' channels"
    norm = getattr(block.module.mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        found["mlp"] = "the MLP normalises over all hidden units between fc1 and fc2"
    return found


def pin_architecture(model: nn.Module) -> None:
    """Remember the constructor arguments while the modules still show them: ``architecture``
    reads ``mlp_ratio`` off the first block, which a sliced MLP would misstate."""
    setattr(model, TIMM_CONFIG_ATTR, architecture(model))
