"""``compress_lowrank``: calibrate, plan ranks under one budget, factorise.

Our reading of arXiv 2402.06004 (docs/methods-lowrank.md): the principal term of each layer is its
whitened truncated SVD; ranks come from one global greedy allocation over all layers' closed-form
error curves; layers past break-even stay dense. Baselines share this code path: ``method="svd"``
(no activations), ``method="asvd"`` (diagonal activation scaling), ``allocation="uniform"``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from vitslim.adapters import describe, family_of, prepare_for_replacement, replace_submodule, replaceable_linears
from vitslim.cait.patch import merge_schedule
from vitslim.errors import ParameterError, VitslimError
from vitslim.lowrank.allocation import LayerCost, LayerPlan, allocate, uniform
from vitslim.lowrank.calibration import collect_grams, images_of, leading_batches, token_fraction
from vitslim.lowrank.compensation import compensate
from vitslim.lowrank.layers import LowRankLinear
from vitslim.lowrank.sensitivity import FISHER_IMAGES, fisher_channels
from vitslim.lowrank.whitening import (
    diagonal_scale,
    diagonal_spectrum,
    plain_spectrum,
    whitened_energy,
    whitened_spectrum,
)
from vitslim.metrics import count_params
from vitslim.recipe import record_step, register_step, span

METHODS = ("whitened", "svd", "asvd")
SENSITIVITIES = ("fisher", "none")
ALLOCATIONS = ("mixed", "uniform")
STEP = "lowrank"


def compressible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The blocks' attention and MLP Linears that a factorised layer can replace: those of
    ``ViTSpec.linears`` that ``replaceable_linears`` allows (a still packed ``nn.MultiheadAttention``
    reads its ``out_proj.weight`` directly, so that projection stays dense; ``compress_lowrank``
    unpacks them first)."""
    replaceable = {id(layer) for layer in replaceable_linears(model).values()}
    return {name: layer for name, layer in describe(model).linears().items() if id(layer) in replaceable}


def target_params(model: nn.Module, *, param_ratio: float | None, params: int | None) -> int:
    """The parameter budget of the ViT (for a user's model holding one, of that ViT alone: the rest of
    the model is not compressed, so a ratio of the whole would say nothing about the backbone)."""
    total = count_params(describe(model).model)
    if (param_ratio is None) == (params is None):
        raise ParameterError("param_ratio", "or params: state exactly one budget (a fraction of the parameters, or a count)")
    if param_ratio is not None:
        if not 0 < param_ratio < 1:
            raise ParameterError("param_ratio", f"must be between 0 and 1 (exclusive), got {param_ratio}")
        return int(param_ratio * total)
    if not 0 < params < total:
        raise ParameterError("params", f"must be between 0 and the model's {total:,} parameters, got {params:,}")
    return int(params)


def _summary(step: dict) -> str:
    ranks = step.get("ranks", {}).values()
    return (f"{step.get('factorisation', '')} low-rank, {len(ranks)} layers at ranks {span(ranks)}"
            f"{', compensated' if step.get('compensation') else ''}, target {step.get('target_params', 0):,} params")


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: give each named Linear its factorised shape (weights are loaded after)."""
    prepare_for_replacement(model)
    for name, rank in step["ranks"].items():
        dense = model.get_submodule(name)
        replace_submodule(model, name, LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None))


def _spectrum(method: str, weight: torch.Tensor, gram: torch.Tensor | None):
    if method == "whitened":
        return whitened_spectrum(weight, gram)
    if method == "asvd":
        return diagonal_spectrum(weight, gram)
    return plain_spectrum(weight)


def _energy(method: str, weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """σ² of ``_spectrum`` without its singular vectors: all the allocator needs when compensation
    refits every factorised layer anyway (faster, and nothing per layer is kept)."""
    if method == "whitened":
        return whitened_energy(weight, gram)
    if method == "asvd":
        matrix = weight.double() * diagonal_scale(gram)
    else:
        matrix = weight.double()
    return torch.linalg.svdvals(matrix).square()


def _sensitivities(model, linears, batches, sensitivity, images, progress) -> dict[str, torch.Tensor]:
    """Per-output-channel weights of each layer's error: measured (fisher), given per layer (a
    dict of scalars), or none."""
    if isinstance(sensitivity, dict):
        return {name: torch.full((layer.out_features,), float(sensitivity.get(name, 1.0)), dtype=torch.float64) for name, layer in linears.items()}
    if sensitivity == "fisher":
        return fisher_channels(model, linears, batches, images=images, progress=progress)
    return {}


def compress_lowrank(
    model: nn.Module,
    batches: Iterable,
    *,
    param_ratio: float | None = None,
    params: int | None = None,
    method: str = "whitened",
    allocation: str = "mixed",
    rank_multiple: int = 1,
    sensitivity: str | dict[str, float] | None = None,
    sensitivity_images: int | None = FISHER_IMAGES,
    compensation: bool | None = None,
    weigh_channels: bool = True,
    min_images: int = 1,
    progress: bool = True,
) -> nn.Module:
    """A factorised copy of ``model`` (the original is left untouched) with at most the budgeted
    parameter count, as ``count_params``/``vitslim eval`` count it (of the ViT inside a user's model). ``sensitivity`` weighs each
    layer's error ("fisher", the default for the whitened method, measured on the first
    ``sensitivity_images`` calibration images, all with None; "none"; or a dict by layer name).
    ``compensation`` (default: on for the whitened method) refits every factorised layer, in
    execution order, to the inputs the compressed prefix gives it (see ``compensation``). The
    plan (per-layer rank and kept energy) is the result's last recipe step, which
    ``vitslim.save`` writes."""
    if method not in METHODS:
        raise VitslimError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise VitslimError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if rank_multiple < 1:
        raise ParameterError("rank_multiple", "must be at least 1")
    if compensation is None:
        compensation = method == "whitened"
    if sensitivity is None:
        # σ² is the output error only for the whitened factorisation; the baselines stay plain
        sensitivity = "fisher" if method == "whitened" else "none"
    if isinstance(sensitivity, str) and sensitivity not in SENSITIVITIES:
        raise VitslimError(f"unknown sensitivity {sensitivity!r}; choose one of {', '.join(SENSITIVITIES)}")
    if sensitivity == "fisher" and method != "whitened":
        raise ParameterError("sensitivity", "fisher weighs output errors, which only the whitened method's spectrum measures; use none with svd/asvd")
    if merge_schedule(model) is not None:
        # calibration runs the blocks without the attention keys that the merging hooks need
        raise VitslimError("the model already merges tokens (CAIT); low-rank compress the original model, "
                           "or compress it with --method lowrank+cait (vitslim.compress_composed) for both")
    target = target_params(model, param_ratio=param_ratio, params=params)
    compressed = copy.deepcopy(model).eval()
    # a packed nn.MultiheadAttention becomes a qkv Linear (its in_proj, whole: one factorisation shares the input
    # basis of q, k and v, as for timm's qkv) and out_proj, which the allocation then weighs like any other layer
    family_of(compressed).unpack_attention(compressed)
    linears = compressible_linears(compressed)
    if not linears:
        raise VitslimError("the model has no compressible Linear layers (attention projections or MLP)")
    fixed = count_params(describe(compressed).model) - sum(layer.weight.numel() for layer in linears.values())
    budget = target - fixed
    if budget < 0:
        raise VitslimError(f"the budget of {target:,} parameters is below the {fixed:,} that stay dense (embeddings, norms, biases, head); raise it")
    # read more than once: statistics, then gradients and/or compensation
    batches = list(batches) if sensitivity == "fisher" or compensation else batches
    spec = describe(compressed)
    fraction, statistics_batches = 1.0, batches
    if isinstance(batches, list):  # else a single pass over a stream: every token of every image
        images = sum(images_of(batch).shape[0] for batch in batches)
        if images < min_images and (method != "svd" or compensation or sensitivity == "fisher"):  # plain SVD reads no activations
            raise VitslimError(f"only {images} calibration images were given; at least {min_images} are needed")
        tokens_per_image = spec.num_patches + spec.num_prefix_tokens
        fraction, statistics_batches = token_fraction(batches, tokens_per_image), leading_batches(batches, tokens_per_image)
    # a list was counted above; its leading images may be fewer than min_images by design
    grams = collect_grams(compressed, linears, statistics_batches, min_images=1 if isinstance(batches, list) else min_images,
                          progress=progress) if method != "svd" else {}
    spectra, energies = {}, {}
    for name, layer in linears.items():
        gram = grams.pop(name).gram if grams else None  # freed as soon as it is used
        if compensation:  # every factorised layer is refitted from scratch: only σ² is needed
            energies[name] = _energy(method, layer.weight.detach(), gram)
        else:
            spectra[name] = _spectrum(method, layer.weight.detach(), gram)
            energies[name] = spectra[name].energy
    # after the Gram matrices are gone: the backward pass keeps activations alive
    channel_weights = _sensitivities(compressed, linears, batches, sensitivity, sensitivity_images, progress)
    costs = []
    for name, layer in linears.items():
        # the allocator scores σ² normalised by the layer's total; fisher weights undo that
        # normalisation so a component's score is the loss it removes, F_l · σ²_i
        scale = float(energies[name].sum()) if sensitivity == "fisher" else 1.0
        weight = float(channel_weights[name].mean()) if name in channel_weights else 1.0
        costs.append(LayerCost(name, layer.out_features, layer.in_features, energies[name], weight * scale))
    floor = sum(rank_multiple * cost.per_rank for cost in costs)
    if budget < floor:
        raise VitslimError(f"the budget of {target:,} parameters cannot give every layer even rank {rank_multiple}; raise it")
    plans: list[LayerPlan] = (allocate if allocation == "mixed" else uniform)(costs, budget, rank_multiple=rank_multiple, min_rank=rank_multiple)
    ranks = {}
    prepare_for_replacement(compressed)
    for plan in plans:
        if plan.rank is None:
            continue
        dense = linears[plan.name]
        bias = dense.bias.detach() if dense.bias is not None else None
        if compensation:  # factors filled in by compensate(); nothing reads them before that
            layer = LowRankLinear(dense.in_features, dense.out_features, plan.rank, bias=bias is not None)
            layer.to(device=dense.weight.device, dtype=dense.weight.dtype)
            if bias is not None:
                layer.up.bias.data.copy_(bias)
        else:
            layer = LowRankLinear.from_factors(*spectra.pop(plan.name).factors(plan.rank), bias, dtype=dense.weight.dtype)
        replace_submodule(compressed, plan.name, layer)
        ranks[plan.name] = plan.rank
    if compensation:
        compensate(model, compressed, list(ranks), batches, output_weights=channel_weights if weigh_channels else None,
                   fraction=fraction, progress=progress)
    record_step(compressed, {
        "method": STEP, "ranks": ranks, "factorisation": method, "allocation": allocation, "rank_multiple": rank_multiple,
        "sensitivity": sensitivity if isinstance(sensitivity, str) else "custom", "compensation": compensation,
        "target_params": target, "kept_energy": {p.name: round(p.kept_energy, 6) for p in plans},
    })
    return compressed
