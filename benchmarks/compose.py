"""Composition benchmark (issue #5): low-rank + CAIT under one target on the reference CIFAR-10 ViT.

Each point is compressed from the original with ``vitslim.lowrank_cait.compress_composed`` and a
``vitslim.LowRankCait`` config (calibration: 256 seeded *train* images; distillation: the train
split), scored on the whole CIFAR-10 test split, saved under ``OUT/models/`` and finally timed
with the original in one interleaved run (CPU, batch 32). The single-method points are the same
code path restricted to one axis, at the same target, so every comparison is speed-matched; a
CAIT (ATME+CDCP) point comes from ``compress_cait`` (a ``vitslim.Cait`` config) with the same
number of KD epochs.

    .venv/bin/python benchmarks/compose.py --runs 40

Rows go to ``OUT/compose.json`` as they are made (a rerun skips finished points); ``OUT/compose.md``
and ``OUT/compose.png`` are written at the end (``--write-only --runs 40`` rewrites them from the JSON alone).
"""

from __future__ import annotations

import time
from pathlib import Path

import common
from common import ROOT, Rows

import vitslim
from vitslim.adapters import describe
from vitslim.cait.compress import Cait, compress_cait
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps as recipe_steps
from vitslim.lowrank.compress import LowRank, compress_lowrank
from vitslim.lowrank_cait import LowRankCait, compress_composed
from vitslim.measure.evaluate import evaluate
from vitslim.methods import Inputs
from vitslim.train import Training

# name: (axes, speed-up, FLOPs ratio, parameter ratio, CDCP epochs, recovery epochs)
POINTS = {
    "composed 2x/50%": (("channels", "lowrank", "tokens"), 2.0, None, 0.5, 1, 1),
    "composed 2.5x/40%": (("channels", "lowrank", "tokens"), 2.5, None, 0.4, 1, 1),
    "low-rank alone 2x": (("lowrank",), 2.0, None, None, 0, 1),
    "low-rank alone 2.5x": (("lowrank",), 2.5, None, None, 0, 1),
    "ATME alone 2.5x": (("tokens",), 2.5, None, None, 0, 0),
    # the probes' timing found low-rank alone short of 2.5x (its "unreachable" row in compose.md), but
    # their speed-ups are measured among ~25 probes: this is its next ladder level, timed in the final run
    "low-rank alone 16%": (("lowrank",), None, None, 0.165, 0, 1),
    # beyond what low-rank alone does well on this very low-rank model: 3x, and its low-rank-only match
    "composed 3x/40%": (("channels", "lowrank", "tokens"), 3.0, None, 0.4, 1, 1),
    "low-rank alone 11%": (("lowrank",), None, None, 0.115, 0, 1),
    "composed 3.5x/20% (low-rank + tokens)": (("lowrank", "tokens"), 3.5, None, 0.2, 0, 1),
    "low-rank alone 8%": (("lowrank",), None, None, 0.085, 0, 1),
    # past low-rank alone's knee (11%) in speed, at the same single KD epoch as the low-rank rows;
    # stated as FLOPs, not speed: a speed target is split by probes timed on this shared machine,
    # and under load they found the speed target unreachable (docs/composition.md)
    "composed 1/8 FLOPs & 12% (low-rank + tokens)": (("lowrank", "tokens"), None, 0.125, 0.12, 0, 1),
    # light merging does not pay on this model; heavier merging on a less squeezed low-rank model,
    # with the whole allowance of 3 KD epochs, and low-rank alone given the same 3 epochs
    "composed 1/9 FLOPs & 16.5% (low-rank + tokens), 3 KD": (("lowrank", "tokens"), None, 0.11, 0.165, 0, 3),
    "low-rank alone 8%, 3 KD": (("lowrank",), None, None, 0.085, 0, 3),
}
# low-rank alone between the ladder's levels (0.1 and 0.07 of the weights), speed-matched to the
# 3-epoch composed point: compress_lowrank, then distill, as the composed points are built
LOWRANK_POINTS = {"low-rank alone 9%, 3 KD": (0.09, 3)}
# compress_cait with 1 KD epoch, at FLOPs-model targets whose measured speed-ups bracket 2x and 2.5x
# (their speed-ups: the ATME+CDCP rows of benchmarks/results/cait/results.md)
CAIT_POINTS = {"ATME+CDCP 2.6x": 2.6, "ATME+CDCP 3.8x": 3.8}


def build(rows: Rows, out: Path, args) -> None:
    original = vitslim.load_model(args.model)
    spec = describe(original)
    train = common.open_split(spec, args.train)
    calibration = common.image_batches(train, 256, 32, labels=True)
    if not rows.has(name="original"):
        score = evaluate(original, args.test, limit=args.eval_limit)
        rows.add({"name": "original", "top1": score["top1"], "params": score["params"], "flops": score["flops"], "kd_epochs": 0})
    wanted = [(name, *settings) for name, settings in POINTS.items()] + [(name, None, target, None, None, 1, 0) for name, target in CAIT_POINTS.items()]
    wanted += [(name, ("lowrank",), None, None, ratio, 0, recovery) for name, (ratio, recovery) in LOWRANK_POINTS.items()]
    for name, axes, speedup, flops_ratio, param_ratio, epochs, recovery in wanted:
        if rows.has(name=name):
            continue
        start = time.perf_counter()
        if axes is None:
            gates = Training(epochs=epochs, batch_size=64) if epochs else None
            compressed = compress_cait(original, Cait(speedup=speedup, gate_training=gates, measure=False), Inputs(train=train, seed=0))
        elif name in LOWRANK_POINTS:
            compressed = compress_lowrank(original, calibration, LowRank(param_ratio=param_ratio))
            vitslim.distill(compressed, original, train, Training(epochs=recovery, lr=1e-4, batch_size=64, seed=1))
        else:
            try:
                config = LowRankCait(speedup=speedup, flops_ratio=flops_ratio, param_ratio=param_ratio, axes=axes,
                                     gate_training=Training(epochs=epochs, batch_size=64) if epochs else None)
                compressed = compress_composed(original, config, Inputs(train=train, calibration=calibration))
                if recovery:
                    vitslim.distill(compressed, original, train, Training(epochs=recovery, batch_size=64, seed=1))
            except VitslimError as error:  # a single axis may not reach the target at all: that is a result
                rows.add({"name": name, "axes": list(axes), "target_speedup": speedup, "unreachable": str(error)})
                continue
        seconds = time.perf_counter() - start
        folder = vitslim.save(compressed, out / "models" / name.replace(" ", "_").replace("/", "-"))
        score = evaluate(compressed, args.test, limit=args.eval_limit)
        steps = {step["method"]: step for step in recipe_steps(compressed)}
        composed = steps.get("lowrank+cait", {})
        used = (epochs if "channels" in steps else 0) + recovery
        rows.add({"name": name, "axes": list(axes or ("channels", "tokens")), "target_speedup": speedup, "target_flops_ratio": flops_ratio,
                  "target_param_ratio": param_ratio,
                  "kd_epochs": used, "top1": score["top1"], "params": score["params"], "flops": score["flops"],
                  "levels": composed.get("levels"), "predicted": composed.get("predicted"),
                  "compress_measured_speedup": composed.get("measured_speedup"), "folder": str(folder.relative_to(ROOT)), "seconds": round(seconds)})


def time_all(rows: Rows, args) -> None:
    original = vitslim.load_model(args.model)
    models = [("original", original)] + [(r["name"], vitslim.load_model(str(ROOT / r["folder"]))) for r in rows if "folder" in r]
    results = vitslim.benchmark(models, batch_size=32, runs=args.runs, progress=False)
    for result in results:
        row = rows.find(name=result.model)
        if row is not None:
            rows.update(row, speedup=result.ratio, images_per_s=result.images_per_s)
    rows.save()


def write(out: Path, rows: Rows, args, parser) -> None:
    plt = common.pyplot()
    base = rows.find(name="original")
    lines = [
        *common.heading("Composition: low-rank + CAIT under one target (vit-d6-cifar10)",
                        f"Command: {common.rerun(parser, args, always=('runs',), leave_out=('write_only',))}. Float32, batch 32, median of "
                        f"{args.runs} interleaved runs, all models in one timing run. Calibration: 256 seeded train images; distillation: "
                        "the train split; top-1: the whole CIFAR-10 test split.", resumed=True),
        "| model | axes | KD epochs | levels (channels / low-rank / tokens) | measured speed-up | params | top-1 | Δ top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['name']} | {'+'.join(r['axes'])} | - | unreachable: {r['unreachable']} | | | | |")
            continue
        levels = r.get("levels")
        shown = " / ".join(f"{levels[a]:g}" for a in ("channels", "lowrank", "tokens")) if levels else "-"
        lines.append(f"| {r['name']} | {'+'.join(r.get('axes', [])) or '-'} | {r['kd_epochs']} | {shown} | {r.get('speedup', 1.0):.2f}x | "
                     f"{100 * r['params'] / base['params']:.1f}% | {100 * r['top1']:.2f}% | {100 * (r['top1'] - base['top1']):+.2f} |")
    lines += ["", "Target (issue #5): a point no single method reaches, with at least 2x measured *and* at most 50% of the parameters, "
              "within 1.5 points, after at most 3 KD epochs."]
    common.write_lines(out / "compose.md", lines, echo=True)
    shown = [r for r in rows if "unreachable" not in r]
    colours = plt.get_cmap("tab20")
    figure, axis = plt.subplots(figsize=(10, 5))
    for index, r in enumerate(shown):
        size = 100 * r["params"] / base["params"]
        axes = set(r.get("axes") or ())
        marker = "o" if not axes else "*" if "lowrank" in axes and "tokens" in axes else "s" if "tokens" in axes else "D"
        axis.scatter(r.get("speedup", 1.0), 100 * r["top1"], s=30 + 1.5 * size, marker=marker, color=colours(index % 20),
                     edgecolor="black", linewidth=0.5, label=f"{r['name']} ({size:.0f}% params)")
    axis.axvline(2.0, color="grey", lw=0.8, ls="--")
    axis.axhline(100 * base["top1"] - 1.5, color="grey", lw=0.8, ls="--")
    axis.set_xlabel("measured speed-up (CPU, batch 32)")
    axis.set_ylabel("CIFAR-10 test top-1 (%)")
    axis.set_title("diamonds: low-rank alone; stars: low-rank + tokens; squares: ATME + CDCP", fontsize=8)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(out / "compose.png", dpi=110)


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser)
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(common.RESULTS / "compose"))
    parser.add_argument("--write-only", action="store_true", help="rewrite compose.md and compose.png from compose.json (no building, no timing)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = Rows(out / "compose.json")
    if not args.write_only:
        build(rows, out, args)
        time_all(rows, args)
    write(out, rows, args, parser)


if __name__ == "__main__":
    main()
