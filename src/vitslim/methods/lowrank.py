"""``lowrank`` (activation-aware whitened SVD, mixed ranks, error compensation; arXiv 2402.06004)
and its two baselines in the same code path, ``svd`` and ``asvd``. See ``vitslim.lowrank``."""

from __future__ import annotations

from torch import nn

from vitslim.lowrank.compress import compress_lowrank
from vitslim.methods import Inputs, Method, Option, SweepBudget, register_method
from vitslim.metrics import count_params
from vitslim.recipe import find_step
from vitslim.table import render

BUDGET = (
    Option("param_ratio", "Keep this fraction of the whole model's parameters (0 < R < 1)."),
    Option("params", "Keep this many parameters (the CLI's --like sets it to another timm model's count).", kind=int),
)
OPTIONS = (
    *BUDGET,
    Option("allocation", "How ranks are shared out: one global greedy pass (mixed) or the same rank everywhere.", kind=str,
           default="mixed", choices=("mixed", "uniform")),
    Option("sensitivity", "Per-layer error weights for mixed allocation (default: fisher for lowrank, none for the baselines).",
           kind=str, choices=("fisher", "none")),
    Option("compensation", "Refit each factorised layer to the compressed prefix's inputs (default: on for lowrank, off for the baselines).",
           kind=bool, off="--no-compensation"),
    Option("rank_multiple", "Round ranks to multiples of k (8 or 16 keep matmuls fast).", kind=int, default=1),
)


def _compressor(factorisation: str):
    def compress(original: nn.Module, inputs: Inputs, *, param_ratio=None, params=None, allocation="mixed", sensitivity=None,
                 compensation=None, rank_multiple=1) -> nn.Module:
        original.to(inputs.device)
        return compress_lowrank(original, inputs.calibration, param_ratio=param_ratio, params=params, method=factorisation,
                                allocation=allocation, sensitivity=sensitivity, compensation=compensation, rank_multiple=rank_multiple,
                                min_images=inputs.calib_images, progress=inputs.progress)

    return compress


def report(original: nn.Module, compressed: nn.Module) -> list[str]:
    step = find_step(compressed, "lowrank")
    rows = [[name, str(step["ranks"].get(name, "dense")), f"{100 * kept:.1f}%"] for name, kept in step["kept_energy"].items()]
    before, after = count_params(original), count_params(compressed)
    return [render(["layer", "rank", "kept energy"], rows),
            f"params {before:,} -> {after:,} ({100 * after / before:.1f}%, target {step['target_params']:,})"]


for _name, _factorisation, _summary in (
    ("lowrank", "whitened", "activation-aware whitened SVD, mixed ranks, layer-wise error compensation"),
    ("svd", "svd", "baseline: plain truncated SVD of the weights (no activations)"),
    ("asvd", "asvd", "baseline: ASVD-style diagonal activation scaling"),
):
    register_method(Method(_name, _summary, _compressor(_factorisation), OPTIONS, report, sweep=(
        SweepBudget(_name, "fractions of the parameters kept (0 < R < 1)", lambda value: 0 < value < 1,
                    lambda value, cap: {"param_ratio": value}, recovery=True),)))
