"""Channel importance by weights, with no training: what the composition's channel probes
(``compose.probe_axes``) slice with to price the channel axis before any gate is trained, and
how CDCP's gates break ties before the distillation has ranked them (``ChannelGates.prefer``)."""

from __future__ import annotations

import torch
from torch import nn

from vitslim.adapters import describe, family_of
from vitslim.cait.gates import channel_pruning_obstacles


def _qkv_rows(attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projection weights, each (heads·head_dim, embed)."""
    if attention.layout == "qkv":
        return attention.qkv.weight.detach().chunk(3, dim=0)
    return attention.q.weight.detach(), attention.k.weight.detach(), attention.v.weight.detach()


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[scores.topk(max(1, keep)).indices] = True
    return mask


def channel_scores(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Weight importance of every sliceable channel, by block index: ``qk`` and ``v`` of shape
    (heads, head_dim), a query/key channel by ‖q row‖·‖k row‖, a value channel by ‖v row‖·‖proj
    column‖, and ``mlp`` (hidden,), a unit by ‖fc1 row‖·‖fc2 column‖."""
    spec, family = describe(model), family_of(model)
    scores = {}
    for block in spec.blocks:
        problems, entry = channel_pruning_obstacles(family, block), {}
        if "attention" not in problems:
            attention = block.attention
            heads, width = attention.num_heads, attention.head_dim
            q, k, v = (rows.norm(dim=1).reshape(heads, width) for rows in _qkv_rows(attention))
            proj = attention.out_proj.weight.detach().norm(dim=0).reshape(heads, width)
            entry["qk"], entry["v"] = q * k, v * proj
        if "mlp" not in problems:
            fc1, fc2 = block.mlp.fc1.weight.detach(), block.mlp.fc2.weight.detach()
            entry["mlp"] = fc1.norm(dim=1) * fc2.norm(dim=0)
        if entry:
            scores[str(block.index)] = entry
    return scores


def importance_masks(model: nn.Module, ratio: float) -> dict:
    """Consistent channel masks (the form ``slice_channels`` takes) keeping ``ratio`` of every
    sliceable block's query/key, value and MLP channels, the most important by
    ``channel_scores`` summed over heads. Every FLOP these parts cost is linear in their widths,
    so the blocks keep about ``ratio`` of their channel FLOPs."""
    masks = {}
    for index, scores in channel_scores(model).items():
        masks[index] = {kind: _top(score.sum(0) if kind != "mlp" else score, round(ratio * score.shape[-1])) for kind, score in scores.items()}
    return masks
