"""The tools users would pick instead of vitslim, set up as the benchmarks compare against them.

Torch-Pruning (``torch_pruning``, the optional extra ``bench``) is the channel-pruning peer: its
dependency graph removes, in every block of a timm ``VisionTransformer``, the MLP's hidden
channels and the same head dimensions in every head (query, key and value alike; heads keep
their number, as in its examples/transformers/prune_timm_vit.py). Unlike that example's default,
the embedding width (the residual stream, and with it the patch embedding, LayerScale, the norms
and the head) stays as it is, so that the pruned model fits every place the original did.

- ``prune_with_torch_pruning``: a pruned copy keeping about ``keep_ratio`` of those channels.
- ``prune_to_speedup``: the keep ratio bisected until the pruned copy measures a target speed-up.

Like every script here, this module imports ``common`` (and through it vitslim) before timm.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable

import common  # noqa: F401 (imports vitslim, whose guard must precede timm: vitslim._compat)
import torch
import torch.nn.functional as F
import torch_pruning
from timm.models.vision_transformer import Attention, Mlp, VisionTransformer
from torch import Tensor, nn

from vitslim.cait.speed import measured_speedup

logger = logging.getLogger(__name__)

IMPORTANCES = ("taylor", "l2")
BISECTION_ROUNDS = 6
TOLERANCE = 0.03  # a measured speed-up within 3% of the target is a hit: about the timing noise on a shared CPU


def prune_with_torch_pruning(model: nn.Module, keep_ratio: float, images: Tensor, *, importance: str = "taylor",
                             round_to: int = 8) -> nn.Module:
    """A copy of the timm ViT ``model`` whose blocks keep about ``keep_ratio`` of their MLP hidden
    channels and of each attention head's dimensions, pruned by Torch-Pruning; ``model`` is untouched.

    ``importance`` is how Torch-Pruning ranks the channels of each group (a channel with every
    weight that reads or writes it): "taylor" (the default) is |weight x gradient| over the
    group, the first-order estimate of the loss change on removing it; "l2" is the weights' norm
    and ignores ``images``. Taylor is the default because it is what Torch-Pruning recommends for
    ViTs (its examples/transformers/readme.md: ViT-B/16 pruned to 22M parameters and fine-tuned
    reached 80.2% with Taylor, 78.1% with L2), so it is the peer a user would run. Its gradients
    are those of the cross-entropy between the model's logits on ``images`` and its own top-1
    predictions (no labels needed; the soft alternative, the KL divergence to its own outputs,
    has zero gradient at the original weights), all ``images`` in one batch. A model without a
    head (``num_classes=0``) returns pooled features instead of logits, and that loss is then
    an arbitrary proxy: prefer "l2" there. ``images`` also trace the model (the first one).
    Pruning only inside the blocks is what that readme calls "bottleneck" pruning.

    Kept counts are rounded to multiples of ``round_to`` (at least one multiple), so the matrix
    shapes stay friendly to vectorised kernels; ``round_to=1`` keeps exactly the nearest count.

    The head dimension shrinks but the heads stay the same in number. The attention scale is the
    original one: removing dimensions leaves the remaining query-key products as they were, so
    the pruned model's ``scale`` is reset to its new head_dim**-0.5 (what fused attention uses
    anyway) and the queries are multiplied by sqrt(new/old) to make up the difference.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if round_to < 1:
        raise ValueError(f"round_to must be at least 1, got {round_to}")
    _check_prunable(model)
    pruned = copy.deepcopy(model).eval()
    attentions = [block.attn for block in pruned.blocks]
    mlps = [block.mlp for block in pruned.blocks]
    ratios = {}
    for attention in attentions:
        ratios[attention.qkv] = _pruning_ratio(attention.head_dim, keep_ratio, round_to)
    for mlp in mlps:
        ratios[mlp.fc1] = _pruning_ratio(mlp.fc1.out_features, keep_ratio, round_to)
    ratios = {layer: ratio for layer, ratio in ratios.items() if ratio > 0}
    if not ratios:
        return pruned.train(model.training)

    with warnings.catch_warnings():
        # It warns of the class token, position embedding and LayerScale gammas, guessing their last
        # dimension is their channels: so it is (the embedding width), and their group is not pruned.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = torch_pruning.pruner.BasePruner(
            pruned, images[:1],
            importance=(torch_pruning.importance.GroupTaylorImportance() if importance == "taylor"
                        else torch_pruning.importance.GroupMagnitudeImportance(p=2)),
            pruning_ratio=0.0,  # only the groups in pruning_ratio_dict are pruned
            pruning_ratio_dict=ratios,
            # the residual stream's group runs through the patch embedding, the head's outputs are the classes: both stay
            ignored_layers=[pruned.patch_embed, pruned.head],
            num_heads={attention.qkv: attention.num_heads for attention in attentions},
            prune_head_dims=True,
            prune_num_heads=False,
        )
    if importance == "taylor":
        _accumulate_self_supervised_gradients(pruned, images)
    pruner.step()
    for parameter in pruned.parameters():
        parameter.grad = None
    for attention in attentions:
        _adopt_pruned_head_dim(attention)
    return pruned.train(model.training)


def prune_to_speedup(original: nn.Module, speedup: float, images: Tensor, *,
                     measure: Callable[[nn.Module, nn.Module], float] = measured_speedup, importance: str = "taylor",
                     round_to: int = 8, rounds: int = BISECTION_ROUNDS,
                     tolerance: float = TOLERANCE) -> tuple[nn.Module, float, float]:
    """``original`` pruned by ``prune_with_torch_pruning`` to a measured ``speedup``: the pruned
    copy, its measured speed-up and its keep ratio.

    Speed-up falls as the keep ratio rises, so the keep ratio is bisected, starting from
    1/speedup (the guess if the blocks took all the time), for at most ``rounds`` measurements;
    it stops at the first within ``tolerance`` of the target. Otherwise the result is the least
    pruned candidate that measured at least (1 - ``tolerance``) of the target, or failing that
    the fastest, with a warning. ``measure(original, pruned)`` returns a speed-up ratio; timings
    being noisy, a rerun can pick another keep ratio.
    """
    if speedup <= 1:
        raise ValueError(f"speedup must be above 1, got {speedup}")
    low, high = 0.0, 1.0  # keep ratios known to be fast enough / too slow
    keep_ratio = 1 / speedup
    candidates: list[tuple[nn.Module, float, float]] = []
    for _ in range(rounds):
        pruned = prune_with_torch_pruning(original, keep_ratio, images, importance=importance, round_to=round_to)
        measured = measure(original, pruned)
        candidates.append((pruned, measured, keep_ratio))
        logger.info("keep ratio %.3f: measured %.2fx against %.2fx", keep_ratio, measured, speedup)
        if abs(measured / speedup - 1) <= tolerance:
            return pruned, measured, keep_ratio
        if measured < speedup:
            high = keep_ratio
        else:
            low = keep_ratio
        keep_ratio = (low + high) / 2
    fast_enough = [candidate for candidate in candidates if candidate[1] >= (1 - tolerance) * speedup]
    if fast_enough:
        return max(fast_enough, key=lambda candidate: candidate[2])
    fastest = max(candidates, key=lambda candidate: candidate[1])
    logger.warning("measured %.2fx at best (keep ratio %.3f) against a %.2fx target", fastest[1], fastest[2], speedup)
    return fastest


def _check_prunable(model: nn.Module) -> None:
    """Refuse what the head-dimension update below would get wrong: other block layouts, and
    attention whose per-head norms or gate Torch-Pruning does not shrink with the heads."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    for index, block in enumerate(model.blocks):
        attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if type(attention) is not Attention or not isinstance(mlp, Mlp):
            raise TypeError(f"block {index}: expected timm Attention and Mlp, got {type(attention).__name__} and "
                            f"{type(mlp).__name__}")
        if not hasattr(attention, "attn_dim"):
            raise TypeError("this timm's Attention reshapes by the embedding width, not attn_dim: upgrade timm")
        norms = (attention.q_norm, attention.k_norm, getattr(attention, "norm", nn.Identity()))
        if not all(isinstance(norm, nn.Identity) for norm in norms) or getattr(attention, "gate", None) is not None:
            raise TypeError(f"block {index}: attention with qk_norm, scale_norm or a gate is not supported")


def _pruning_ratio(channels: int, keep_ratio: float, round_to: int) -> float:
    """The ratio for Torch-Pruning that keeps ``keep_ratio`` of ``channels`` rounded to a multiple of
    ``round_to``; half a channel more keeps its int() of the kept count from falling one short."""
    multiples = max(1, round(keep_ratio * channels / round_to))
    kept = min(channels, multiples * round_to)
    return max(0.0, (channels - kept - 0.5) / channels)


def _accumulate_self_supervised_gradients(model: nn.Module, images: Tensor) -> None:
    """Gradients of the cross-entropy to the model's own top-1 predictions, for Taylor importance."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        logits = model(images)
        F.cross_entropy(logits, logits.detach().argmax(dim=-1)).backward()


def _adopt_pruned_head_dim(attention: Attention) -> None:
    """Make ``attention`` reshape by its pruned qkv, keeping the original attention scale."""
    old_head_dim = attention.head_dim
    new_head_dim = attention.qkv.out_features // (3 * attention.num_heads)
    attention.head_dim = new_head_dim
    attention.attn_dim = new_head_dim * attention.num_heads
    attention.scale = new_head_dim**-0.5
    queries = slice(0, attention.attn_dim)  # qkv's rows are queries, keys, values, each head after head
    with torch.no_grad():
        attention.qkv.weight[queries] *= math.sqrt(new_head_dim / old_head_dim)
        if attention.qkv.bias is not None:
            attention.qkv.bias[queries] *= math.sqrt(new_head_dim / old_head_dim)
