"""Composition benchmark (issue #5): low-rank + CAIT under one target on the reference CIFAR-10 ViT.

Each point is compressed from the original with ``vitslim.compress_composed`` (calibration: 256
seeded *train* images; distillation: the train split), scored on the whole CIFAR-10 test split,
saved under ``OUT/models/`` and finally timed with the original in one interleaved run (CPU,
batch 32). The single-method points are the same code path restricted to one axis, at the same
target, so every comparison is speed-matched; a CAIT (ATME+CDCP) point comes from
``compress_cait`` with the same number of KD epochs.

    .venv/bin/python benchmarks/compose.py --runs 40

Rows go to ``OUT/compose.json`` as they are made (a rerun skips finished points); ``OUT/compose.md``
and ``OUT/compose.png`` are written at the end (``--write-only --runs 40`` rewrites them from the JSON alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import vitslim
from vitslim import data as imagedata
from vitslim.adapters import describe
from vitslim.atomic import atomic_file
from vitslim.cait.compress import compress_cait
from vitslim.compose import compress_composed
from vitslim.errors import VitslimError
from vitslim.evaluate import evaluate
from vitslim.lowrank.compress import compress_lowrank
from vitslim.recipe import steps as recipe_steps
from vitslim.train import Training

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# name: (axes, speed-up, FLOPs ratio, parameter ratio, CDCP epochs, recovery epochs)
POINTS = {
    "composed 2x/50%": (("channels", "lowrank", "tokens"), 2.0, None, 0.5, 1, 1),
    "composed 2.5x/40%": (("channels", "lowrank", "tokens"), 2.5, None, 0.4, 1, 1),
    "low-rank alone 2x": (("lowrank",), 2.0, None, None, 0, 1),
    "low-rank alone 2.5x": (("lowrank",), 2.5, None, None, 0, 1),
    "ATME alone 2.5x": (("tokens",), 2.5, None, None, 0, 0),
    # the probes' timing found low-rank alone short of 2.5x, but their speed-ups are measured
    # among ~25 probes: this is its next ladder level, timed in the final run with the rest
    "low-rank alone 16%": (("lowrank",), None, None, 0.165, 0, 1),
    # beyond what low-rank alone does well on this very low-rank model: 3x, and its low-rank-only match
    "composed 3x/40%": (("channels", "lowrank", "tokens"), 3.0, None, 0.4, 1, 1),
    "low-rank alone 11%": (("lowrank",), None, None, 0.115, 0, 1),
    "composed 3.5x/20% (low-rank + tokens)": (("lowrank", "tokens"), 3.5, None, 0.2, 0, 1),
    "low-rank alone 8%": (("lowrank",), None, None, 0.085, 0, 1),
    # past low-rank alone's knee (11%) in speed, at the same single KD epoch as the low-rank rows;
    # stated as FLOPs, not speed: a speed target is split by probes timed on this shared machine,
    # and under load they found 3.2x unreachable
    "composed 1/8 FLOPs & 12% (low-rank + tokens)": (("lowrank", "tokens"), None, 0.125, 0.12, 0, 1),
    # light merging does not pay on this model; heavier merging on a less squeezed low-rank model,
    # with the whole allowance of 3 KD epochs, and low-rank alone given the same 3 epochs
    "composed 1/9 FLOPs & 16.5% (low-rank + tokens), 3 KD": (("lowrank", "tokens"), None, 0.11, 0.165, 0, 3),
    "low-rank alone 8%, 3 KD": (("lowrank",), None, None, 0.085, 0, 3),
}
# low-rank alone between the ladder's levels (0.1 and 0.07 of the weights), speed-matched to the
# 3-epoch composed point: compress_lowrank and distill as compress_composed calls them
LOWRANK_POINTS = {"low-rank alone 9%, 3 KD": (0.09, 3)}
# compress_cait with 1 KD epoch, at FLOPs-model targets whose measured speed-ups bracket 2x and 2.5x
# (benchmarks/cait.py: 2.6 -> 2.00x, 3.4 -> 2.44x)
CAIT_POINTS = {"ATME+CDCP 2.6x": 2.6, "ATME+CDCP 3.8x": 3.8}


def _save(out: Path, rows: list[dict]) -> None:
    atomic_file(out / "compose.json", lambda partial: partial.write_text(json.dumps(rows, indent=2)))


def build(rows: list[dict], out: Path, args) -> None:
    original = vitslim.load_model(args.model)
    spec = describe(original)
    train = imagedata.open_images(args.train, imagedata.build_transform(spec.preprocessing), class_names=spec.label_names)
    calibration = list(imagedata.make_loader(imagedata.select(train, limit=256, seed=0), 32))
    if not any(r["name"] == "original" for r in rows):
        score = evaluate(original, args.test, limit=args.eval_limit)
        rows.append({"name": "original", "top1": score["top1"], "params": score["params"], "flops": score["flops"], "kd_epochs": 0})
        _save(out, rows)
    wanted = [(name, *settings) for name, settings in POINTS.items()] + [(name, None, target, None, None, 1, 0) for name, target in CAIT_POINTS.items()]
    wanted += [(name, ("lowrank",), None, None, ratio, 0, recovery) for name, (ratio, recovery) in LOWRANK_POINTS.items()]
    for name, axes, speedup, flops_ratio, param_ratio, epochs, recovery in wanted:
        if any(r["name"] == name for r in rows):
            continue
        start = time.perf_counter()
        if axes is None:
            compressed = compress_cait(original, train, speedup=speedup, gate_training=Training(epochs=epochs, batch_size=64) if epochs else None,
                                       seed=0, measure=False)
        elif name in LOWRANK_POINTS:
            compressed = compress_lowrank(original, calibration, param_ratio=param_ratio)
            vitslim.distill(compressed, original, train, Training(epochs=recovery, lr=1e-4, batch_size=64, seed=1))
        else:
            try:
                compressed = compress_composed(original, calibration, train, speedup=speedup, flops_ratio=flops_ratio, param_ratio=param_ratio, axes=axes,
                                               gate_training=Training(epochs=epochs, batch_size=64) if epochs else None)
                if recovery:
                    vitslim.distill(compressed, original, train, Training(epochs=recovery, batch_size=64, seed=1))
            except VitslimError as error:  # a single axis may not reach the target at all: that is a result
                rows.append({"name": name, "axes": list(axes), "target_speedup": speedup, "unreachable": str(error)})
                _save(out, rows)
                continue
        seconds = time.perf_counter() - start
        folder = vitslim.save(compressed, out / "models" / name.replace(" ", "_").replace("/", "-"))
        score = evaluate(compressed, args.test, limit=args.eval_limit)
        steps = {step["method"]: step for step in recipe_steps(compressed)}
        composed = steps.get("composed", {})
        used = (epochs if "channels" in steps else 0) + recovery
        rows.append({"name": name, "axes": list(axes or ("channels", "tokens")), "target_speedup": speedup, "target_flops_ratio": flops_ratio,
                     "target_param_ratio": param_ratio,
                     "kd_epochs": used, "top1": score["top1"], "params": score["params"], "flops": score["flops"],
                     "levels": composed.get("levels"), "predicted": composed.get("predicted"),
                     "compress_measured_speedup": composed.get("measured_speedup"), "folder": str(folder.relative_to(ROOT)), "seconds": round(seconds)})
        _save(out, rows)


def time_all(rows: list[dict], out: Path, args) -> None:
    original = vitslim.load_model(args.model)
    models = [("original", original)] + [(r["name"], vitslim.load_model(str(ROOT / r["folder"]))) for r in rows if "folder" in r]
    results = vitslim.benchmark(models, batch_size=32, runs=args.runs, progress=False)
    for result in results:
        for row in rows:
            if row["name"] == result.model:
                row["speedup"], row["images_per_s"] = result.ratio, result.images_per_s
    _save(out, rows)


def write(out: Path, rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["name"] == "original")
    lines = [
        "# Composition: low-rank + CAIT under one target (vit-d6-cifar10)",
        "",
        f"Command: `.venv/bin/python benchmarks/compose.py --runs {args.runs}`. CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, float32, batch 32, median of {args.runs} interleaved runs, all models in one timing run. "
        "Calibration: 256 seeded train images; distillation: the train split; top-1: the whole CIFAR-10 test split.",
        "",
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
    (out / "compose.md").write_text("\n".join(lines) + "\n")
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg" / "test.zip"))
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compose"))
    parser.add_argument("--write-only", action="store_true", help="rewrite compose.md and compose.png from compose.json (no building, no timing)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((out / "compose.json").read_text()) if (out / "compose.json").exists() else []
    if not args.write_only:
        build(rows, out, args)
        time_all(rows, out, args)
    write(out, rows, args)
    print((out / "compose.md").read_text())


if __name__ == "__main__":
    main()
