"""``cait``: asymmetric token merging (ATME, or ToMe as the baseline) and, with gate training,
consistent dynamic channel pruning (CDCP); arXiv 2309.15755. See ``vitslim.cait``."""

from __future__ import annotations

from torch import nn

from vitslim.cait.compress import compress_cait
from vitslim.cait.patch import TOKEN_MAPS, merge_schedule
from vitslim.cait.schedule import METHODS
from vitslim.errors import ParameterError
from vitslim.methods import Inputs, Method, Option, SweepBudget, register_method
from vitslim.metrics import count_params
from vitslim.recipe import find_step
from vitslim.table import render
from vitslim.train import Training

SPEEDUP = Option("speedup", "Target throughput, times the original's (measured after compression).")
MERGE = Option("merge", "Token merging method (tome: the ToMe baseline; window: merging whole 2x2 windows, an ALGM-style "
                        "grid-keeping baseline).", kind=str, default="atme", choices=METHODS)
TOKEN_MAP = Option("token_map", "full: the merged tokens are spread back over the whole grid before they leave the ViT (dense heads, "
                                "patch pooling); merged: they reach the head merged (faster); auto: full when the output reads the "
                                "patch tokens.", kind=str, default="auto", choices=TOKEN_MAPS)
CONCENTRATION = Option(
    "concentration", "How front-loaded the merge schedule is (block i's share of the merged tokens weighs (depth-1-i)^C; 0 spreads "
    "evenly). Default: the C of 0, 1, 2 or 4 whose schedule keeps the original's output best on the calibration images.")
GATE_TRAINING = Option("gate_training", "Train CDCP's channel gates with distillation for E epochs over all the training images, "
                       "then slice the pruned channels away (0: training-free token merging only).", kind=Training,
                       flag="--gate-epochs")
CHANNEL_RATIO = Option("channel_ratio", "Fraction of the blocks' FLOPs the channel gates keep (default: what the speed-up leaves after tokens).")
OPTIONS = (
    SPEEDUP, GATE_TRAINING, MERGE,
    Option("token_speedup", "The share of the speed-up given to token merging (default: its square root when channels are "
                            "pruned, all of it otherwise)."),
    CHANNEL_RATIO, CONCENTRATION,
    Option("consistent", "One channel mask shared by all heads (CDCP), or per-head masks (the ablation).", kind=bool, default=True,
           off="--unconstrained"),
    Option("measure", "Time the result against the original and merge more until the measured speed-up reaches the target "
                      "(--plan-only: trust the FLOPs model).", kind=bool, default=True, off="--plan-only"),
    TOKEN_MAP,
)


def compress(original: nn.Module, inputs: Inputs, *, speedup=None, gate_training=None, merge="atme", token_speedup=None,
             channel_ratio=None, concentration=None, consistent=True, measure=True, token_map="auto") -> nn.Module:
    if speedup is None:
        raise ParameterError("speedup", "is needed by the cait method (S > 1, a multiple of the original's throughput)")
    return compress_cait(original, inputs.train, speedup=speedup, gate_training=gate_training, merge=merge, token_speedup=token_speedup,
                         channel_ratio=channel_ratio, concentration=concentration, calib_images=inputs.calib_images, consistent=consistent,
                         seed=inputs.seed, device=inputs.device, measure=measure, token_map=token_map,
                         progress=inputs.progress)


def merging_report(compressed: nn.Module) -> list[str]:
    """The merge schedule's table and how its concentration was chosen."""
    schedule, step = merge_schedule(compressed), find_step(compressed, "merging")
    if schedule is None or step is None:
        return []
    levels = schedule.method == "atme"
    lines = [render(["block", "tokens merged after it", "level"], [[str(b), str(r), str(level) if levels else "-"] for b, r, level in schedule.steps])]
    scores = step.get("concentration_kl")
    lines.append(f"schedule concentration {step['concentration']:g}"
                 + (f" (score to the original on the calibration images: {', '.join(f'{c}: {kl:.4f}' for c, kl in scores.items())})" if scores else ""))
    levels = step.get("first_level_score")
    if levels:
        lines.append(f"ATME first level {step['first_level']} (score to the original: {', '.join(f'{level}: {score:.4f}' for level, score in levels.items())})")
    return lines


def report(original: nn.Module, compressed: nn.Module) -> list[str]:
    lines = merging_report(compressed)
    channels = find_step(compressed, "channels")
    if channels is not None:
        lines.append(render(["block", "head dim", "MLP hidden"], [[index, str(w.get("head_dim", "-")), str(w.get("mlp_hidden", "-"))]
                                                                 for index, w in channels["blocks"].items()]))
    measured = (find_step(compressed, "merging") or {}).get("measured_speedup")
    lines.append(f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x" if measured else ""))
    return lines


# the merge schedule's shape is chosen on its own seeded subset of ``Inputs.train`` (cait.shape)
# a sweep plans by the FLOPs model: timing inside it would let the load of the moment shape the
# plan; its final run measures every point together
SWEEP = tuple(SweepBudget(name, "speed-ups (greater than 1)", lambda value: value > 1,
                          lambda value, cap, merge=merge: {"speedup": value, "merge": merge, "measure": False}, gate_training=True)
              for name, merge in (("cait", "atme"), ("tome", "tome")))
register_method(Method("cait", "token merging (ATME) plus, with --gate-epochs, consistent channel pruning (CDCP)", compress, OPTIONS, report,
                       calibrates=False, sweep=SWEEP))
