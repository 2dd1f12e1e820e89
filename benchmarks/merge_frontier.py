"""Token merging at equal *measured* speed on dinov2-s14: ATME against ToMe, 2×2 windows, row/column
(CubistMerge-style) merging and ATME's first (lattice) reading, in eager PyTorch and in ONNX Runtime.

A FLOPs target measures differently for each merge kind (each merge step costs its own time), so
the kinds are compared here where a user would compare them: at the same measured speed-up. Each
kind is compressed by ``vitslim.compress(model, Cait(speedup=S, merge=kind, measure=False))`` at
a few FLOPs targets, its concentration chosen on calibration images, and every model is timed
against the original in one interleaved run per runtime (batch ``--batch``, 20 rounds). The
fidelity at measured 1.3, 1.5 and 2.0× is read off each kind's curve by linear interpolation
between the measured points that bracket it, the original counting as the point at 1.0× (never
extrapolated: a speed-up beyond a kind's fastest measured point shows as "-").

- ``--task dense``: the saliency model (backbone + decoder, a user's model around the ViT; dense
  mode). Calibration on ImageNet sample images 0-499 (sorted), fidelity to the original's maps on
  500-999 (Pearson r, IoU@0.8, MAE); the whole model and the backbone alone are timed.
- ``--task classification``: the plain ViT with its CIFAR-10 head (classification mode).
  Calibration on seeded CIFAR-10 train images, top-1, agreement and KL on 2,000 seeded test images.

    .venv/bin/python benchmarks/merge_frontier.py                            # dense, about 35 minutes on 2 cores
    .venv/bin/python benchmarks/merge_frontier.py --task classification      # about 30 minutes

Rows resume from ``--out``'s models/rows.json; ``--retime`` times every model again.
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch
from common import CIFAR_TEST, CIFAR_TRAIN, ROOT, Column, Rows
from dinov2_classification import RememberedOutputs
from dinov2_dense import dense_data
from dinov2_pages import stored
from dinov2_saliency import IMAGENET, MODEL, THRESHOLD, load_saliency, saliency_skeleton

import vitslim
from vitslim.cait.patch import merge_schedule
from vitslim.deploy import export
from vitslim.errors import VitslimError
from vitslim.measure import runtimes
from vitslim.measure.metrics import count_params

MERGES = (("atme", "ATME"), ("tome", "ToMe"), ("window", "2x2 window (ALGM-style)"), ("row-column", "row/column (CubistMerge-style)"),
          ("atme-lattice", "ATME, lattice reading"))
FLOPS_TARGETS = (1.5, 2.0, 2.6)
MEASURED = (1.3, 1.5, 2.0)
RUNTIMES = ("eager", "onnxruntime")
TIMING_GUARD = 0.25  # the timing's own ONNX check, on random images, after check_exports passed on real ones
SCORES = {"dense": ("pearson", "iou", "mae"), "classification": ("top1", "agreement", "kl")}
SHOWN = {"dense": (("pearson", "r", "{:.4f}"), ("iou", "IoU", "{:.3f}")),
         "classification": (("top1", "top-1", "{:.2%}"), ("agreement", "agreement", "{:.2%}"))}
PARTS = {"dense": ("backbone", "whole"), "classification": ("whole",)}


def say(text: str) -> None:
    print(text, flush=True)


def interpolate(points: list[tuple[float, float]], at: float) -> float | None:
    """The value at ``at`` on the piecewise-linear curve through ``points`` (speed-up, value);
    None outside the measured range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


class Task:
    """What one task compresses, on which images, and how it scores a model."""

    def __init__(self, args) -> None:
        self.args = args
        if args.task == "dense":
            self.original = load_saliency(args.model)
            args.dense_report = args.report
            self.train, self.report = dense_data(vitslim.describe(self.original), args)
            self.teacher = self.original
        else:
            self.original = vitslim.load_model(args.model)
            spec = vitslim.describe(self.original)
            self.train, self.report = common.open_split(spec, args.train), common.open_split(spec, args.test)
            self.teacher = RememberedOutputs(self.original)

    def score(self, model) -> dict:
        args = self.args
        options = {"threshold": THRESHOLD, "batch_size": 16} if args.task == "dense" else {}
        score = vitslim.evaluate(model, self.report, teacher=self.teacher, limit=args.report, seed=args.seed, progress=args.progress,
                                 **options)
        return {**{name: score[name] for name in SCORES[args.task]}, "images": score["images"]}

    def load(self, row: dict):
        skeleton = {"skeleton": saliency_skeleton(self.args.model)} if self.args.task == "dense" else {}
        return vitslim.load_model(str(ROOT / row["folder"]), **skeleton)

    @staticmethod
    def part(model, part: str):
        return model.backbone if part == "backbone" else model


def compress_rows(rows: Rows, task: Task, args) -> None:
    if not rows.has(key="original"):
        perfect = {"pearson": 1.0, "iou": 1.0, "mae": 0.0, "agreement": 1.0, "kl": 0.0}
        if args.task == "classification":
            perfect["top1"] = vitslim.evaluate(task.original, task.report, limit=args.report, seed=args.seed, progress=args.progress)["top1"]
        rows.add({"key": "original", "merge": None, **{name: perfect[name] for name in SCORES[args.task]}})
    for merge, label in MERGES:
        if merge not in args.merges:
            continue
        for target in FLOPS_TARGETS:
            key = f"{merge}-{target:g}"
            if rows.has(key=key):
                continue
            say(f"[frontier {args.task}] {key}: compressing")
            started = time.perf_counter()
            try:
                compressed = vitslim.compress(task.original, vitslim.Cait(speedup=target, merge=merge, measure=False), task.train,
                                              calib_images=args.calib_images, seed=args.seed, progress=args.progress)
            except VitslimError as error:  # beyond what this kind can merge
                say(f"[frontier {args.task}] {key}: skipped ({error})")
                rows.add({"key": key, "merge": merge, "variant": label, "target": target, "skipped": str(error)})
                continue
            seconds = time.perf_counter() - started
            scores = task.score(compressed)
            saved = vitslim.save(compressed, Path(args.out) / "models" / key)
            schedule = merge_schedule(compressed)
            row = rows.add({"key": key, "merge": merge, "variant": label, "target": target, "seconds": seconds, **scores,
                            "merged": schedule.merged, "steps": [list(step) for step in schedule.steps], "folder": stored(saved)})
            say(f"[frontier {args.task}] {key}: " + ", ".join(f"{name} {row[name]:.4f}" for name in SCORES[args.task])
                + f" ({seconds:.0f} s)")


def check_exports(rows: list[dict], models: list, task: Task, part: str, cache: Path, args) -> None:
    """Each model's ONNX file (the one the timing then reuses) against PyTorch on real reported
    images, within ``export.ONNX_TOLERANCE`` or float32 rounding (``export.check_onnx``); the
    result goes into its row. Random images, which ``vitslim.benchmark`` checks on, make merge
    decisions near ties (every token alike), where ONNX Runtime's rounding can flip one; the
    timing does not depend on which tokens merge, so it runs with a looser guard once this
    check has passed."""
    images = torch.stack([task.report[index][0] for index in range(8)])
    for name, model in models:
        row = next((row for row in rows if row["key"] == name), None)
        path, _ = runtimes.cached_onnx(task.part(model, part).eval(), cache)
        check = export.check_onnx(task.part(model, part), path, images, export.ONNX_TOLERANCE)
        if row is not None:
            row.update({f"{part}_onnx_check": str(check), f"{part}_onnx_passed": check.passed})
        say(f"[frontier {args.task}] {name} ({part}) ONNX on 8 report images: {check}")
        if not check.passed:
            raise SystemExit(f"{name} ({part}): its ONNX export differs from PyTorch on real images: {check}")


def time_rows(rows: Rows, task: Task, args) -> None:
    done = [row for row in rows if "folder" in row]
    models = [("original", task.original)] + [(row["key"], task.load(row)) for row in done]
    for part in PARTS[args.task]:
        cache = Path(args.out) / "models" / "onnx" / part
        if "onnxruntime" in args.runtime:
            check_exports(done, models, task, part, cache, args)
        say(f"[frontier {args.task}] timing {len(models)} models ({part}) in {', '.join(args.runtime)}, batch {args.batch}")
        results = vitslim.benchmark([(name, task.part(model, part)) for name, model in models], batch_size=args.batch, runs=20,
                                    runtime=args.runtime, onnx_cache=cache, onnx_tolerance=TIMING_GUARD, progress=args.progress)
        for result in results:
            row = next((row for row in done if row["key"] == result.model), None)
            if row is not None:
                rows.update(row, **{f"{part}_{result.runtime}": result.ratio, f"{part}_{result.runtime}_spread": result.ratio_spread})
        rows.save()


def frontier(rows: list[dict], original: dict, task: str, part: str, runtime: str) -> list[dict]:
    """Per merge kind, its scores at each of ``MEASURED`` speed-ups, interpolated."""
    table = []
    for merge, label in MERGES:
        points = [(row[f"{part}_{runtime}"], row) for row in rows if row.get("merge") == merge and f"{part}_{runtime}" in row]
        if not points:
            continue
        line = {"variant": label, "range": f"{min(p for p, _ in points):.2f}-{max(p for p, _ in points):.2f}x"}
        for speed in MEASURED:
            for name in SCORES[task]:
                line[f"{name}@{speed:g}"] = interpolate([(1.0, original[name])] + [(p, row[name]) for p, row in points], speed)
        table.append(line)
    return table


def plot(rows: list[dict], original: dict, task: str, part: str, runtimes: list[str], path: Path) -> None:
    """The two shown scores against the measured ``part`` speed-up, one panel per runtime and
    score, one line per merge kind (the original at 1.0x)."""
    plt = common.pyplot()
    shown = SHOWN[task]
    figure, axes = plt.subplots(len(runtimes), len(shown), figsize=(5 * len(shown), 3.6 * len(runtimes)), squeeze=False)
    for axes_row, runtime in zip(axes, runtimes):
        for axis, (name, label, _) in zip(axes_row, shown):
            for merge, variant in MERGES:
                points = sorted((row[f"{part}_{runtime}"], row[name]) for row in rows if row.get("merge") == merge and f"{part}_{runtime}" in row)
                if points:
                    axis.plot([1.0] + [x for x, _ in points], [original[name]] + [y for _, y in points], marker="o", label=variant)
            axis.set_xlabel(f"measured {part} speed-up, {runtime} (x)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"dinov2-s14, {task}: token merging kinds at measured speed")
    figure.tight_layout()
    common.atomic_file(path, lambda partial: figure.savefig(partial, dpi=110, format="png"))
    plt.close(figure)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--task", choices=tuple(SCORES), default="dense")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--imagenet", default=str(IMAGENET), help="dense: the ImageNet sample.")
    parser.add_argument("--dense-train", type=int, default=500, help="dense: images 0..N-1 of the sorted sample calibrate (≤ 500).")
    parser.add_argument("--train", default=CIFAR_TRAIN, help="classification: the training images.")
    parser.add_argument("--test", default=CIFAR_TEST, help="classification: the test images.")
    parser.add_argument("--report", type=int, default=None, help="Reported images (seeded): dense of 500-999 (default 500), "
                                                                  "classification of the test images (default 2,000).")
    parser.add_argument("--merges", nargs="+", default=[merge for merge, _ in MERGES], choices=[merge for merge, _ in MERGES],
                        help="The merge kinds to compress (rows already measured are kept).")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runtime", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--retime", action="store_true", help="Time again even when every row has its timing.")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=None, help="Default: benchmarks/results/frontier (dense) or frontier-classification.")
    args = parser.parse_args()
    args.report = args.report or (500 if args.task == "dense" else 2000)
    args.out = args.out or str(common.RESULTS / ("frontier" if args.task == "dense" else "frontier-classification"))
    torch.manual_seed(args.seed)
    rows = Rows(Path(args.out) / "models" / "rows.json")
    task = Task(args)
    compress_rows(rows, task, args)
    parts = PARTS[args.task]
    if args.retime or any(f"{part}_{runtime}" not in row for row in rows if "folder" in row for part in parts for runtime in args.runtime):
        time_rows(rows, task, args)
    points, original = [row for row in rows if "folder" in row], rows.find(key="original")
    scores = SCORES[args.task]
    point_columns = [Column("variant", "merge"), Column("target", "FLOPs target", "{:g}x"), Column("merged", "tokens merged"),
                     *(Column(f"{part}_{runtime}", f"{part} {runtime}", "{:.2f}x", "-") for part in parts for runtime in args.runtime),
                     *(Column(name, name, "{:.4f}") for name in scores)]
    frontier_columns = [Column("variant", "merge"), Column("range", "measured range"),
                        *(Column(f"{name}@{speed:g}", f"{label} @{speed:g}x", fmt, "-") for speed in MEASURED
                          for name, label, fmt in SHOWN[args.task])]
    if args.task == "dense":
        setting = (f"The saliency model (`{common.shown(args.model)}` with its decoder, dense mode); images "
                   f"`{common.shown(args.imagenet)}` in sorted order: 0-{args.dense_train - 1} calibrate ({args.calib_images}, "
                   f"seeded), {args.report} of 500-999 (seeded) are reported against the original's maps.")
    else:
        setting = (f"The ViT with its CIFAR-10 head (`{common.shown(args.model)}`, classification mode; original top-1 "
                   f"{original['top1']:.2%}); {args.calib_images} seeded train images (`{common.shown(args.train)}`) calibrate, "
                   f"{args.report} seeded test images (`{common.shown(args.test)}`) are reported, agreement and KL against the "
                   f"original's predictions.")
    lines = common.heading(f"Token merging at equal measured speed: dinov2-s14, {args.task}", (
        f"{setting} Training-free; each kind planned by the FLOPs model for {', '.join(f'{t:g}x' for t in FLOPS_TARGETS)} "
        f"with its concentration chosen on the calibration images. Speed-ups: one interleaved run per runtime and part "
        f"(batch {args.batch}, 20 rounds) against the original in the same runtime, float32; values at a measured speed-up "
        f"interpolated linearly between the measured points around it (the original is the point at 1.0x). Every ONNX "
        f"file was checked against PyTorch on 8 reported images (within {export.ONNX_TOLERANCE:g} or float32 rounding, "
        f"`export.check_onnx`) before timing; the timing's own check on random images is loosened to {TIMING_GUARD:g}, "
        f"since on noise a merge decision is a near-tie that ONNX Runtime's rounding may flip. Command: "
        f"{common.rerun(parser, args, always=('task',), leave_out=('progress', 'retime'))}"))
    lines += ["", "### Measured points", "", *common.markdown_table(point_columns, points)]
    tables = {"points": (point_columns, points)}
    for part in parts:
        for runtime in args.runtime:
            table = frontier(points, original, args.task, part, runtime)
            lines += ["", f"### At equal measured {part} speed-up, {runtime}", "", *common.markdown_table(frontier_columns, table)]
            tables[f"{part}-{runtime}"] = (frontier_columns, table)
    lines += ["", "![scores against measured speed-up](frontier.png)"]
    common.write_table(Path(args.out) / "frontier.md", lines, tables, echo=True, original=original,
                       params=count_params(task.original))
    plot(points, original, args.task, parts[0], args.runtime, Path(args.out) / "frontier.png")


if __name__ == "__main__":
    main()
