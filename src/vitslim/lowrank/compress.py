"""The ``lowrank`` method (``LowRank``) and its baselines ``svd`` and ``asvd``: calibrate, plan
ranks under one budget, factorise.

Our reading of arXiv 2402.06004 (docs/methods-lowrank.md): the principal term of each layer is its
whitened truncated SVD; ranks come from one global greedy allocation over all layers' closed-form
error curves; layers past break-even stay dense. The baselines share this code path and differ
only in their factorisation: ``SVD`` (no activations), ``ASVD`` (diagonal activation scaling);
``allocation="uniform"`` is the allocation baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vitslim._infra.table import render
from vitslim.adapters import describe, family_of, prepare_for_replacement, replace_submodule, replaceable_linears
from vitslim.cait.patch import merge_schedule
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import CORRUPT, find_step, record_step, register_step, span, step_field, step_layer, step_number
from vitslim.lowrank.allocation import LayerCost, LayerPlan, allocate, uniform
from vitslim.lowrank.calibration import (
    ALLOCATION_TOKENS,
    STAT_TOKENS,
    collect_grams,
    images_of,
    leading_batches,
    token_fraction,
)
from vitslim.lowrank.compensation import compensate, update_left_factors
from vitslim.lowrank.layers import LowRankLinear
from vitslim.lowrank.sensitivity import FISHER_IMAGES, fisher_channels
from vitslim.lowrank.whitening import (
    diagonal_scale,
    diagonal_spectrum,
    plain_spectrum,
    whitened_energy,
    whitened_spectrum,
)
from vitslim.measure.metrics import count_params
from vitslim.measure.objective import mean_divergence
from vitslim.methods import Example, Inputs, Method, SweepBudget, register_method, setting

STEP = "lowrank"


def compressible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The blocks' attention and MLP Linears that a factorised layer can replace: those of
    ``ViTSpec.linears`` that ``replaceable_linears`` allows (a still packed ``nn.MultiheadAttention``
    reads its ``out_proj.weight`` directly, so that projection stays dense; ``compress_lowrank``
    unpacks them first)."""
    replaceable = {id(layer) for layer in replaceable_linears(model).values()}
    return {name: layer for name, layer in describe(model).linears().items() if id(layer) in replaceable}


@dataclass(frozen=True)
class ParameterBudget(Method):
    """The parameter budget a method may state (low-rank, and the composed method's cap): a
    fraction of the ViT's parameters or a count, at most one of them."""

    param_ratio: float | None = setting(None, "Keep this fraction of the whole model's parameters (0 < R < 1).")
    params: int | None = setting(None, "Keep this many parameters (the CLI's --like sets it to another timm model's count).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.param_ratio is not None and self.params is not None:
            raise ParameterError("param_ratio", "and params both state the parameter budget; give one")
        if self.param_ratio is not None and not 0 < self.param_ratio < 1:
            raise ParameterError("param_ratio", f"must be between 0 and 1 (exclusive), got {self.param_ratio}")
        if self.params is not None and not self.params > 0:
            raise ParameterError("params", f"must be a positive parameter count, got {self.params:,}")

    def target_params(self, model: nn.Module) -> int | None:
        """The budget in parameters of the ViT (for a user's model holding one, of that ViT alone:
        the rest of the model is not compressed, so a ratio of the whole would say nothing about the
        backbone); None when no budget is stated."""
        total = count_params(describe(model).model)
        if self.param_ratio is not None:
            return int(self.param_ratio * total)
        if self.params is not None and not self.params < total:
            raise ParameterError("params", f"must be below the model's {total:,} parameters, got {self.params:,}")
        return self.params


def _summary(step: dict) -> str:
    ranks = step.get("ranks", {}).values()
    return (f"{step.get('factorisation', '')} low-rank, {len(ranks)} layers at ranks {span(ranks)}"
            f"{', compensated' if step.get('compensation') else ''}{', SVD-LLM update' if step.get('update') else ''}, target {step.get('target_params', 0):,} params")


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: give each named Linear its factorised shape (weights are loaded after). Every
    name and rank is checked before any layer is built: a rank beyond the layer's smaller side
    (where factorising stops saving anything) can only come from a corrupt file."""
    checked = []
    for name, rank in step_field(step, "ranks", dict).items():
        dense = step_layer(model, name, "a rank")
        if not isinstance(dense, nn.Linear):
            raise VitslimError(f"a rank names {name!r}, which is a {type(dense).__name__}, not a Linear layer; {CORRUPT}")
        checked.append((name, dense, step_number(rank, f"the rank of {name!r}", 1, min(dense.in_features, dense.out_features))))
    prepare_for_replacement(model)
    for name, dense, rank in checked:
        replace_submodule(model, name, LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None))


def _spectrum(factorisation: str, weight: torch.Tensor, gram: torch.Tensor | None):
    if factorisation == "whitened":
        return whitened_spectrum(weight, gram)
    if factorisation == "asvd":
        return diagonal_spectrum(weight, gram)
    return plain_spectrum(weight)


def _energy(factorisation: str, weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """σ² of ``_spectrum`` without its singular vectors: all the allocator needs when compensation
    refits every factorised layer anyway (faster, and nothing per layer is kept)."""
    if factorisation == "whitened":
        return whitened_energy(weight, gram)
    if factorisation == "asvd":
        matrix = weight.double() * diagonal_scale(gram)
    else:
        matrix = weight.double()
    return torch.linalg.svdvals(matrix).square()


def _sensitivities(model, linears, batches, sensitivity, images, progress, objective) -> dict[str, torch.Tensor]:
    """Per-output-channel weights of each layer's error: measured (fisher, by ``objective``), or none."""
    if sensitivity == "fisher":
        return fisher_channels(model, linears, batches, images=images, progress=progress, objective=objective)
    return {}


def _fraction_budget(name: str) -> SweepBudget:
    """How the sweep reads a low-rank budget: the fraction of the parameters kept."""
    return SweepBudget(name, "fractions of the parameters kept (0 < R < 1)", lambda value: 0 < value < 1,
                       lambda value, cap: {"param_ratio": value}, recovery=True)


@register_method
@dataclass(frozen=True)
class LowRank(ParameterBudget):
    """Activation-aware low-rank factors (arXiv 2402.06004): whitened truncated SVD of every
    compressible Linear, ranks allocated under one parameter budget, each factorised layer then
    refitted to the inputs the compressed prefix gives it (compensation)."""

    name: ClassVar[str] = "lowrank"
    summary: ClassVar[str] = "activation-aware whitened SVD, mixed ranks, layer-wise error compensation"
    factorisation: ClassVar[str] = "whitened"
    sweep: ClassVar[tuple[SweepBudget, ...]] = (_fraction_budget("lowrank"),)
    examples: ClassVar[tuple[Example, ...]] = tuple(
        Example(f"low-rank {percent}%", f"lowrank-{percent}", {"param_ratio": percent / 100, "rank_multiple": 4},
                f"whitened SVD, mixed ranks, {percent}% of the parameters") for percent in (50, 30))

    allocation: Literal["mixed", "uniform"] = setting("mixed", "How ranks are shared out: one global greedy pass (mixed) or the "
                                                                "same rank everywhere.")
    sensitivity: Literal["fisher", "none"] | None = setting(
        None, "Per-layer error weights for mixed allocation (default: fisher for lowrank, none for the baselines).")
    compensation: bool | None = setting(None, "Refit each factorised layer to the compressed prefix's inputs (default: on for lowrank, "
                                              "off for the baselines).", off="--no-compensation")
    compensation_target: Literal["block", "layer", "auto"] = setting(
        "block", "What compensation refits each layer to: its own output (layer), or, for the layer that writes the residual "
                 "stream (fc2), the block's output, cancelling the drift the compressed prefix left in the stream (block); "
                 "auto fits both on three quarters of the calibration images, keeps the one closer to the original on the "
                 "other quarter (by the objective) and refits it on all of them (three compensation passes).")
    rank_multiple: int = setting(1, "Round ranks to multiples of k (8 or 16 keep matmuls fast).")
    sensitivity_images: int | None = setting(FISHER_IMAGES, "Calibration images the fisher sensitivity is measured on (None: all).",
                                             cli=False)
    weigh_channels: bool = setting(True, "Compensation weighs each output channel by its sensitivity.", cli=False)
    statistics_tokens: int | None = setting(None, "Tokens per layer the input statistics use at most (None: "
                                                  "lowrank.calibration.STAT_TOKENS).", cli=False)
    allocation_tokens: int | None = setting(None, "Tokens per layer the allocation's statistics use at most when compensation refits "
                                                  "every layer (None: lowrank.calibration.ALLOCATION_TOKENS, within statistics_tokens).",
                                            cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.param_ratio is None and self.params is None:
            raise ParameterError("param_ratio", "or params: state exactly one budget (a fraction of the parameters, or a count)")
        if isinstance(self.rank_multiple, bool) or not (isinstance(self.rank_multiple, int) and self.rank_multiple >= 1):
            raise ParameterError("rank_multiple", f"must be a whole number of at least 1, got {self.rank_multiple}")
        for name in ("statistics_tokens", "allocation_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParameterError(name, f"must be a whole number of at least 1, got {value}")
        if self.sensitivity == "fisher" and self.factorisation != "whitened":
            raise ParameterError("sensitivity", "fisher weighs output errors, which only the whitened method's spectrum measures; use none "
                                                "with svd/asvd")
        if self.compensation_target != "block" and not self.compensates:
            raise ParameterError("compensation_target", f"chooses what compensation refits, and {self.name} runs without compensation "
                                                        "here; drop it, or turn compensation on")

    @property
    def compensates(self) -> bool:
        return self.factorisation == "whitened" if self.compensation is None else self.compensation

    @property
    def weighs_by(self) -> str:
        """The sensitivity in effect: σ² is the output error only for the whitened factorisation,
        so the baselines stay plain."""
        return self.sensitivity or ("fisher" if self.factorisation == "whitened" else "none")

    def compress(self, model: nn.Module, inputs: Inputs) -> nn.Module:
        model.to(inputs.device)
        return compress_lowrank(model, inputs.calibration, self, min_images=inputs.calib_images, progress=inputs.progress,
                                objective=inputs.objective)

    def report(self, original: nn.Module, compressed: nn.Module) -> list[str]:
        step = find_step(compressed, STEP)
        rows = [[name, str(step["ranks"].get(name, "dense")), f"{100 * kept:.1f}%"] for name, kept in step["kept_energy"].items()]
        before, after = count_params(original), count_params(compressed)
        return [render(["layer", "rank", "kept energy"], rows),
                f"params {before:,} -> {after:,} ({100 * after / before:.1f}%, target {step['target_params']:,})"]


@register_method
@dataclass(frozen=True)
class SVD(LowRank):
    """Baseline: plain truncated SVD of the weights (no activations)."""

    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = "baseline: plain truncated SVD of the weights (no activations)"
    factorisation: ClassVar[str] = "svd"
    examples: ClassVar[tuple[Example, ...]] = ()
    sweep: ClassVar[tuple[SweepBudget, ...]] = (_fraction_budget("svd"),)


@register_method
@dataclass(frozen=True)
class ASVD(LowRank):
    """Baseline: ASVD-style diagonal activation scaling."""

    name: ClassVar[str] = "asvd"
    summary: ClassVar[str] = "baseline: ASVD-style diagonal activation scaling"
    factorisation: ClassVar[str] = "asvd"
    examples: ClassVar[tuple[Example, ...]] = ()
    sweep: ClassVar[tuple[SweepBudget, ...]] = (_fraction_budget("asvd"),)


@register_method
@dataclass(frozen=True)
class SVDLLM(LowRank):
    """Baseline: SVD-LLM (arXiv 2403.07378) as its released code runs it: truncation-aware
    whitening (the whitened SVD lowrank uses), the same share of every matrix's parameters
    (uniform ranks, no sensitivity), then its layer-wise closed-form update of each layer's up
    factor (``compensation.update_left_factors``). The published recipe vitslim's correction is
    compared with (benchmarks/studies/lowrank_correction.py)."""

    name: ClassVar[str] = "svd-llm"
    summary: ClassVar[str] = "baseline: SVD-LLM (truncation-aware whitening, uniform ranks, closed-form update of the up factor)"
    examples: ClassVar[tuple[Example, ...]] = ()
    sweep: ClassVar[tuple[SweepBudget, ...]] = (_fraction_budget("svd-llm"),)
    updates_left_factor: ClassVar[bool] = True

    allocation: Literal["mixed", "uniform"] = setting("uniform", "How ranks are shared out: the same share of every matrix "
                                                                  "(uniform, as SVD-LLM) or one global greedy pass (mixed).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sensitivity == "fisher" or self.compensation:
            raise ParameterError("sensitivity" if self.sensitivity == "fisher" else "compensation",
                                 "is vitslim's, not SVD-LLM's; use method lowrank for it")

    @property
    def compensates(self) -> bool:
        return False

    @property
    def weighs_by(self) -> str:
        return "none"


TARGETS = ("block", "layer")
HELD_OUT_EVERY = 4  # auto's choice: every 4th calibration image is held out


def choose_compensation_target(original: nn.Module, factorised: nn.Module, names: list[str], batches: list, *,
                               output_weights: dict[str, torch.Tensor] | None, fraction: float, objective: str,
                               progress: bool) -> tuple[str, dict[str, float]]:
    """Which compensation target keeps ``factorised`` closer to ``original``: each of ``TARGETS``
    refits a copy on the calibration images but every ``HELD_OUT_EVERY``-th, and is scored by the
    objective's mean distance to the original on those held-out images. Neither wins everywhere
    (the block target's drift correction helps dinov2-s14 at every budget and costs vit-d6 a third
    of a point at 15%), so the choice is measured per model, never on the images it is fitted to."""
    images = torch.cat([images_of(batch) for batch in batches])
    if images.shape[0] < HELD_OUT_EVERY:
        raise VitslimError(f'compensation_target="auto" holds out every {HELD_OUT_EVERY}th calibration image, so it needs at least '
                           f'{HELD_OUT_EVERY}; {images.shape[0]} were given. Give more images, or name the target ("block" or "layer")')
    size = images_of(batches[0]).shape[0]
    held = torch.arange(images.shape[0]) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    fitting, held_out = list(images[~held].split(size)), list(images[held].split(size))
    original_spec = describe(original)
    held_out = [batch.to(next(original.parameters()).device) for batch in held_out]
    with torch.no_grad():
        reference = [original_spec.output(batch) for batch in held_out]
    scores = {}
    for target in TARGETS:
        candidate = copy.deepcopy(factorised)
        compensate(original, candidate, names, fitting, output_weights=output_weights, fraction=fraction, target=target, progress=progress)
        scores[target] = mean_divergence(describe(candidate), reference, held_out, objective)
    return min(TARGETS, key=scores.__getitem__), scores


def compress_lowrank(model: nn.Module, batches: Iterable, config: LowRank, *, min_images: int = 1, progress: bool = True,
                     objective: str = "auto") -> nn.Module:
    """A factorised copy of ``model`` (the original is left untouched) by ``config``, with at most
    its budgeted parameter count, as ``count_params``/``vitslim eval`` count it (of the ViT inside a
    user's model), calibrated on ``batches`` (at least ``min_images`` images). A "fisher"
    sensitivity is measured on the first ``config.sensitivity_images`` calibration images,
    judged by ``objective``; compensation refits every factorised layer, in execution order, to
    the inputs the compressed prefix gives it (see ``compensation``). The plan (per-layer rank
    and kept energy) is the result's last recipe step, which ``vitslim.save`` writes."""
    factorisation, compensation, sensitivity, rank_multiple = config.factorisation, config.compensates, config.weighs_by, config.rank_multiple
    left_update = getattr(config, "updates_left_factor", False)
    target = config.target_params(model)
    if merge_schedule(model) is not None:
        # calibration runs the blocks without the attention keys that the merging hooks need
        raise VitslimError("the model already merges tokens (CAIT); low-rank compress the original model, "
                           "or compress it with the lowrank+cait method (vitslim.LowRankCait) for both")
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
    batches = list(batches) if sensitivity == "fisher" or compensation or left_update else batches
    spec = describe(compressed)
    fraction, statistics_batches = 1.0, batches
    if isinstance(batches, list):  # else a single pass over a stream: every token of every image
        images = sum(images_of(batch).shape[0] for batch in batches)
        if images < min_images and (factorisation != "svd" or compensation or sensitivity == "fisher"):  # plain SVD reads no activations
            raise VitslimError(f"only {images} calibration images were given; at least {min_images} are needed")
        tokens_per_image = spec.num_patches + spec.num_prefix_tokens
        limit = config.statistics_tokens
        fraction = token_fraction(batches, tokens_per_image, limit)
        if compensation:  # the Gram matrices only allocate the ranks
            limit = config.allocation_tokens or min(ALLOCATION_TOKENS, limit or STAT_TOKENS)
        statistics_batches = leading_batches(batches, tokens_per_image, limit)
    # a list was counted above; its leading images may be fewer than min_images by design
    grams = collect_grams(compressed, linears, statistics_batches, min_images=1 if isinstance(batches, list) else min_images,
                          progress=progress) if factorisation != "svd" else {}
    spectra, energies = {}, {}
    for name, layer in linears.items():
        gram = grams.pop(name).gram if grams else None  # freed as soon as it is used
        if compensation:  # every factorised layer is refitted from scratch: only σ² is needed
            energies[name] = _energy(factorisation, layer.weight.detach(), gram)
        else:
            spectra[name] = _spectrum(factorisation, layer.weight.detach(), gram)
            energies[name] = spectra[name].energy
    # after the Gram matrices are gone: the backward pass keeps activations alive
    channel_weights = _sensitivities(compressed, linears, batches, sensitivity, config.sensitivity_images, progress, objective)
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
    plans: list[LayerPlan] = (allocate if config.allocation == "mixed" else uniform)(costs, budget, rank_multiple=rank_multiple, min_rank=rank_multiple)
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
    compensation_target, target_scores = config.compensation_target, None
    if compensation:
        output_weights = channel_weights if config.weigh_channels else None
        if compensation_target == "auto":
            compensation_target, target_scores = choose_compensation_target(model, compressed, list(ranks), batches, output_weights=output_weights,
                                                                            fraction=fraction, objective=objective, progress=progress)
        compensate(model, compressed, list(ranks), batches, output_weights=output_weights, fraction=fraction, target=compensation_target,
                   progress=progress)
    if left_update:
        update_left_factors(model, compressed, list(ranks), batches, fraction=fraction, progress=progress)
    record_step(compressed, {
        "method": STEP, "ranks": ranks, "factorisation": factorisation, "allocation": config.allocation, "rank_multiple": rank_multiple,
        "sensitivity": sensitivity, "compensation": compensation, **({"compensation_target": compensation_target} if compensation else {}),
        **({"compensation_target_scores": target_scores} if target_scores else {}), **({"update": "svd-llm left factor"} if left_update else {}),
        "target_params": target, "kept_energy": {p.name: round(p.kept_energy, 6) for p in plans},
    })
    return compressed
