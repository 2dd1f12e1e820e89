"""Channel pruning made physical: masks frozen, layers cut to the widths they keep.

``slice_channels`` takes the masks of trained gates (``cait.gates``) or given ones
(``cait.importance``), removes the gates and cuts the projections into physically smaller
``nn.Linear``s that compute exactly what the masked model computed, and records the new widths
as a recipe step ``{"method": "channels", ...}`` so a saved model reloads with its smaller shapes
(the step's rebuild and summary are registered here, with it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitslim.adapters import describe, family_of, prepare_for_replacement, replace_submodule
from vitslim.adapters.base import BlockSpec, ModelFamily, ViTSpec
from vitslim.cait.gates import GATES_ATTR, ChannelGates, channel_pruning_obstacles, detach_gates
from vitslim.errors import VitslimError
from vitslim.io.recipe import CORRUPT, record_step, register_step, span, step_field, step_number

STEP = "channels"


def _install(model: nn.Module, names: dict[int, str], old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put a Linear holding ``weight`` and ``bias`` where ``old`` is."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    replace_submodule(model, names[id(old)], new)


def _keep_rows(model: nn.Module, names: dict[int, str], layer: nn.Linear, rows: torch.Tensor, scale: torch.Tensor) -> None:
    scale = scale.to(layer.weight.device, layer.weight.dtype)
    rows = rows.to(layer.weight.device)
    bias = None if layer.bias is None else layer.bias.detach()[rows] * scale
    _install(model, names, layer, layer.weight.detach()[rows] * scale[:, None], bias)


def _keep_columns(model: nn.Module, names: dict[int, str], layer: nn.Linear, columns: torch.Tensor, scale: torch.Tensor) -> None:
    scale = scale.to(layer.weight.device, layer.weight.dtype)
    weight = layer.weight.detach()[:, columns.to(layer.weight.device)] * scale[None, :]
    _install(model, names, layer, weight, None if layer.bias is None else layer.bias.detach())


def _slice_attention(model: nn.Module, names: dict[int, str], block: BlockSpec, qk: torch.Tensor, qk_keep: torch.Tensor,
                     v: torch.Tensor, v_keep: torch.Tensor) -> None:
    """Cut the attention to ``qk.shape[1]`` channels per head: head ``h`` keeps query/key
    channels ``qk[h]`` and value channels ``v[h]``, zeroed where ``*_keep`` is False (padding).

    The model scaled logits by 1/√head_dim and will scale them by 1/√width, so the kept query
    rows are multiplied by √(width/head_dim) to compute the same logits.
    """
    attn = block.attention
    heads, head_dim, width = attn.num_heads, attn.head_dim, qk.shape[1]
    offsets = torch.arange(heads)[:, None] * head_dim

    def rows(channels: torch.Tensor) -> torch.Tensor:
        return (offsets + channels).flatten()

    parts = [(rows(qk), qk_keep.flatten().double() * math.sqrt(width / head_dim)), (rows(qk), qk_keep.flatten().double()),
             (rows(v), v_keep.flatten().double())]
    if attn.layout == "qkv":
        size = heads * head_dim
        _keep_rows(model, names, attn.qkv, torch.cat([r + p * size for p, (r, _) in enumerate(parts)]), torch.cat([s for _, s in parts]))
    else:
        for layer, (r, s) in zip((attn.q, attn.k, attn.v), parts):
            _keep_rows(model, names, layer, r, s)
    _keep_columns(model, names, attn.out_proj, rows(v), v_keep.flatten().double())
    family_of(model).resize_attention(attn, width, head_dim)


def _slice_mlp(model: nn.Module, names: dict[int, str], block: BlockSpec, units: torch.Tensor, keep: torch.Tensor) -> None:
    """Keep hidden ``units`` of the MLP, zeroed where ``keep`` is False (padding)."""
    scale = keep.double()
    _keep_rows(model, names, block.mlp.fc1, units, scale)
    _keep_columns(model, names, block.mlp.fc2, units, scale)


def _choose(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a boolean (rows, channels) mask: the kept channels, then pruned ones up to
    ``width``; and which of those are kept."""
    chosen = []
    for row in mask:
        kept = row.nonzero().flatten()
        chosen.append(torch.cat([kept, (~row).nonzero().flatten()[: width - len(kept)]]))
    index = torch.stack(chosen)
    return index, torch.gather(mask, 1, index)


def _block_at(spec: ViTSpec, key) -> BlockSpec:
    try:
        index = int(key)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(spec.blocks):
        raise VitslimError(f"no block {key!r}: the model has blocks 0 to {len(spec.blocks) - 1}")
    return spec.blocks[index]


def _head_masks(entry: dict, block: BlockSpec) -> tuple[torch.Tensor, torch.Tensor]:
    attn = block.attention
    if not {"qk", "v"} <= entry.keys():
        raise VitslimError(f"block {block.index}: give both the qk and the v mask to slice the attention")
    found = []
    for kind in ("qk", "v"):
        mask = torch.as_tensor(entry[kind]).detach().cpu().bool()
        if mask.shape == (attn.head_dim,):
            mask = mask.expand(attn.num_heads, attn.head_dim)
        if mask.shape != (attn.num_heads, attn.head_dim):
            raise VitslimError(f"block {block.index}: the {kind} mask has shape {tuple(mask.shape)}, expected "
                               f"({attn.num_heads}, {attn.head_dim}) or ({attn.head_dim},)")
        found.append(mask)
    return found[0], found[1]


def _mlp_mask(entry: dict, block: BlockSpec) -> torch.Tensor:
    mask = torch.as_tensor(entry["mlp"]).detach().cpu().bool()
    if mask.shape != (block.mlp.fc1.out_features,):
        raise VitslimError(f"block {block.index}: the mlp mask has shape {tuple(mask.shape)}, expected ({block.mlp.fc1.out_features},)")
    return mask


def slice_channels(model: nn.Module, gates: ChannelGates | None = None, *, masks: dict | None = None) -> dict:
    """Freeze the masks and make ``model`` (in place) a smaller dense model computing exactly
    what the masked model computed; remove the gates; record the widths in its recipe.

    The masks come from ``gates`` (by default the model's own), or from ``masks`` in the form
    ``ChannelGates.masks()`` returns (a (head_dim,) mask stands for every head). In each sliced
    attention every head keeps the same width k', the largest query/key or value count of any
    head (at least 1); heads that keep fewer are padded with zeroed channels. An MLP keeps its
    kept hidden units (at least one, zeroed if none was kept).

    Returns ``{"method": "channels", "consistent": bool, "blocks": {index: {...}}}`` with, per
    sliced block, ``head_dim`` (k') and the kept ``qk`` and ``v`` channels per head, and
    ``mlp_hidden`` and the kept ``mlp`` units. The recipe step holds the same without the
    channel lists (the shapes are what a reload rebuilds; the weights come after).
    """
    attached = getattr(model, GATES_ATTR, None)
    if gates is not None and masks is not None:
        raise VitslimError("give the gates or the masks to slice with, not both")
    if gates is not None and gates is not attached:
        raise VitslimError("these gates are not attached to this model")
    if masks is None:
        if not isinstance(attached, ChannelGates):
            raise VitslimError("the model carries no channel gates and no masks were given: attach_gates and train first, or pass masks=")
        gates, masks = attached, attached.masks()
    family = family_of(model)
    if any({"qk", "v"} & entry.keys() for entry in masks.values()):
        family.unpack_attention(model)  # a packed nn.MultiheadAttention's heads cannot narrow (gates have done it already)
    spec = describe(model)
    plan = [_plan(family, _block_at(spec, key), entry) for key, entry in masks.items()]  # all checked before any change
    if isinstance(attached, ChannelGates):
        detach_gates(model)
    family.pin_architecture(spec.model)  # while the modules still show the original widths
    prepare_for_replacement(model)
    names = {id(module): name for name, module in model.named_modules()}
    result, step = {}, {}
    for block, qk, v, mlp in plan:
        done, recorded = {}, {}
        if qk is not None:
            width = max(1, int(qk.sum(-1).max()), int(v.sum(-1).max()))
            _slice_attention(model, names, block, *_choose(qk, width), *_choose(v, width))
            recorded["head_dim"] = width
            done.update(head_dim=width, qk=[row.nonzero().flatten().tolist() for row in qk],
                        v=[row.nonzero().flatten().tolist() for row in v])
        if mlp is not None:
            index, keep = _choose(mlp[None], max(1, int(mlp.sum())))
            _slice_mlp(model, names, block, index[0], keep[0])
            recorded["mlp_hidden"] = index.shape[1]
            done.update(mlp_hidden=index.shape[1], mlp=mlp.nonzero().flatten().tolist())
        step[str(block.index)] = recorded
        result[str(block.index)] = done
    if gates is not None:
        consistent = gates.consistent
    else:  # explicit masks: consistent when every head of every block has the same masks
        consistent = all(bool((mask == mask[0]).all()) for _, qk, v, _ in plan if qk is not None for mask in (qk, v))
    record_step(model, {"method": STEP, "consistent": consistent, "blocks": step})
    return {"method": STEP, "consistent": consistent, "blocks": result}


def _plan(family: ModelFamily, block: BlockSpec, entry: dict) -> tuple:
    """One block's masks, checked: (block, qk, v, mlp), None for a part left as it is."""
    unknown = set(entry) - {"qk", "v", "mlp"}
    if unknown:
        raise VitslimError(f"block {block.index}: unknown mask kinds {sorted(unknown)}; expected qk, v and mlp")
    problems = channel_pruning_obstacles(family, block)
    for part, kinds in (("attention", {"qk", "v"}), ("mlp", {"mlp"})):
        if kinds & entry.keys() and part in problems:
            raise VitslimError(f"block {block.index}: the {part} cannot be sliced: {problems[part]}")
    qk, v = _head_masks(entry, block) if {"qk", "v"} & entry.keys() else (None, None)
    return block, qk, v, _mlp_mask(entry, block) if "mlp" in entry else None


def _summary(step: dict) -> str:
    widths = step.get("blocks", {}).values()
    heads = [w["head_dim"] for w in widths if "head_dim" in w]
    hidden = [w["mlp_hidden"] for w in widths if "mlp_hidden" in w]
    return (f"{'consistent' if step.get('consistent', True) else 'per-head'} channel pruning: head dim {span(heads) if heads else 'kept'}, "
            f"MLP hidden {span(hidden) if hidden else 'kept'}")


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: give the recorded blocks their sliced shapes and head widths, with zero
    weights (the saved weights are loaded after)."""
    spec = describe(model)
    widths = []
    for key, entry in step_field(step, "blocks", dict).items():  # all checked before any change: a kept width is at most the original
        block = _block_at(spec, key)
        if not isinstance(entry, dict):
            raise VitslimError(f"block {key}'s widths are {entry!r:.60}, not a JSON object; {CORRUPT}")
        head_dim = entry.get("head_dim")
        if head_dim is not None:
            head_dim = step_number(head_dim, f"block {key}'s head_dim", 1, block.attention.head_dim)
        mlp_hidden = entry.get("mlp_hidden")
        if mlp_hidden is not None:
            mlp_hidden = step_number(mlp_hidden, f"block {key}'s mlp_hidden", 1, block.mlp.fc1.out_features)
        widths.append((block, head_dim, mlp_hidden))
    prepare_for_replacement(model)
    names = {id(module): name for name, module in model.named_modules()}
    for block, head_dim, mlp_hidden in widths:
        if head_dim is not None:
            zeros = torch.zeros(block.attention.num_heads, head_dim, dtype=torch.long)
            _slice_attention(model, names, block, zeros, zeros.bool(), zeros, zeros.bool())
        if mlp_hidden is not None:
            zeros = torch.zeros(mlp_hidden, dtype=torch.long)
            _slice_mlp(model, names, block, zeros, zeros.bool())
