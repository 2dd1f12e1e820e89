"""``lowrank+cait``: channels, low-rank factors and tokens under one target, split between them
by measured cost. See ``vitslim.compose``."""

from __future__ import annotations

from torch import nn

from vitslim.compose import compress_composed
from vitslim.errors import ParameterError
from vitslim.methods import Inputs, Method, Option, SweepBudget, register_method
from vitslim.methods.cait import CHANNEL_RATIO, CONCENTRATION, GATE_TRAINING, MERGE
from vitslim.methods.lowrank import BUDGET
from vitslim.metrics import count_params
from vitslim.recipe import find_step
from vitslim.table import render

OPTIONS = (
    Option("speedup", "Target throughput, times the original's (measured after compression)."),
    Option("flops_ratio", "Keep at most this fraction of the original's FLOPs per image."),
    *BUDGET, GATE_TRAINING, CHANNEL_RATIO, MERGE, CONCENTRATION,
)


def compress(original: nn.Module, inputs: Inputs, *, speedup=None, flops_ratio=None, param_ratio=None, params=None, gate_training=None,
             channel_ratio=None, merge="atme", concentration=None) -> nn.Module:
    if speedup is None and flops_ratio is None and param_ratio is None and params is None:
        raise ParameterError("speedup", "(or flops_ratio, param_ratio, params): the lowrank+cait method needs one to state a target")
    original.to(inputs.device)
    return compress_composed(original, inputs.calibration, inputs.train, speedup=speedup, flops_ratio=flops_ratio, param_ratio=param_ratio,
                             params=params, gate_training=gate_training, channel_ratio=channel_ratio, merge=merge, concentration=concentration,
                             device=inputs.device, progress=inputs.progress)


def report(original: nn.Module, compressed: nn.Module) -> list[str]:
    split = find_step(compressed, "composed")
    table = render(["axis", "level", "probe cost (KL)", "probe FLOPs ratio", "probe speed-up"],
                   [[probe["axis"], f"{probe['level']:g}", f"{probe['cost']:.4f}", f"{probe['flops_ratio']:.2f}",
                     "not timed" if probe["speedup"] is None else f"{probe['speedup']:.2f}x"]
                    for probe in split["probes"] if probe["level"] == split["levels"][probe["axis"]]])
    measured = split.get("measured_speedup")
    return [table, f"split: {', '.join(f'{axis} {level:g}' for axis, level in split['levels'].items())}; "
                   f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x" if measured else "")]


register_method(Method("lowrank+cait", "all three axes (channels, low-rank, tokens), the target split between them by measured cost",
                       compress, OPTIONS, report, sweep=(
    SweepBudget("lowrank+cait", "FLOPs reduction factors (greater than 1; 2 keeps half the FLOPs), with an optional parameter cap (2@0.5)",
                lambda value: value > 1, lambda value, cap: {"flops_ratio": 1 / value, "param_ratio": cap}, cap=True,
                gate_training=True, recovery=True),)))
