"""Channel masks chosen by weight importance (``cait.gates.channel_scores``, which CDCP's gates
also start ranked by), with no training: what the composition's channel probes
(``compose.probe_axes``) slice with to price the channel axis before any gate is trained."""

from __future__ import annotations

import torch
from torch import nn

from vitslim.cait.gates import channel_scores


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[scores.topk(max(1, keep)).indices] = True
    return mask


def importance_masks(model: nn.Module, ratio: float) -> dict:
    """Consistent channel masks (the form ``slice_channels`` takes) keeping ``ratio`` of every
    sliceable block's query/key, value and MLP channels, the most important by
    ``channel_scores`` summed over heads. Every FLOP these parts cost is linear in their widths,
    so the blocks keep about ``ratio`` of their channel FLOPs."""
    masks = {}
    for index, scores in channel_scores(model).items():
        masks[index] = {kind: _top(score.sum(0) if kind != "mlp" else score, round(ratio * score.shape[-1])) for kind, score in scores.items()}
    return masks
