"""The measured speed-up on a busy machine: how noisy timings are caught, and what the promise does then.

``vitslim.Cait(speedup=S)`` promises a *measured* speed-up, so it times the result and merges more
while the timing falls short. On a machine that something else keeps busy, a timing can fall
short by noise alone, and merging more on it trades accuracy for nothing. ``vitslim.benchmark``
therefore reports each ratio's spread across its interleaved rounds (``ratio_spread``, the
relative interquartile range of the per-round ratios), and the promise never tightens a schedule
on a noisy timing (``vitslim.cait.speed``).

This study times the reference ViT against its training-free ATME 1.5 model, ``--repeats`` times
on the quiet machine and ``--repeats`` times while a busy loop holds one core, then runs the same
``vitslim.compress(model, Cait(speedup=1.5), images)`` both ways (calibration: 64 seeded train
images) and compares the schedules they end with.

    .venv/bin/python benchmarks/studies/busy_timing.py      # about 6 minutes on 2 cores
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import torch

import vitslim
from vitslim.cait.patch import merge_schedule
from vitslim.cait.schedule import predicted_speedup
from vitslim.io.recipe import find_step

OUT = common.RESULTS / "studies" / "busy_timing"


@contextmanager
def busy_core():
    """A process that keeps one core busy for the with-block."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        burner.kill()
        burner.wait()


def timings(original, merged, repeats: int, batch: int) -> list[dict]:
    rows = []
    for _ in range(repeats):
        result = vitslim.benchmark([("original", original), ("ATME 1.5", merged)], batch_size=batch, runs=20, progress=False)[1]
        rows.append({"ratio": round(result.ratio, 3), "ratio_spread": round(result.ratio_spread, 3), "noisy": result.noisy})
    return rows


def promise(original, images) -> dict:
    started = time.perf_counter()
    compressed = vitslim.compress(original, vitslim.Cait(speedup=1.5), images, calib_images=64, progress=False)
    step = find_step(compressed, "merging")
    return {"seconds": round(time.perf_counter() - started, 1), "measured": step.get("measured_speedup"),
            "planned_flops_speedup": round(predicted_speedup(vitslim.describe(compressed), merge_schedule(compressed),
                                                             vitslim.describe(original)), 3),
            "merged_tokens": merge_schedule(compressed).merged}


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=common.REFERENCE_MODEL)
    parser.add_argument("--train", default=common.CIFAR_TRAIN)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    original = vitslim.load_model(args.model)
    images = vitslim.open_images(args.train, model=original)
    merged = vitslim.compress(original, vitslim.Cait(speedup=1.5, measure=False), images, calib_images=64, progress=False)
    result = {"quiet": {"timings": timings(original, merged, args.repeats, args.batch)}}
    with busy_core():
        result["busy"] = {"timings": timings(original, merged, args.repeats, args.batch)}
    result["quiet"]["promise"] = promise(original, images)
    with busy_core():
        result["busy"]["promise"] = promise(original, images)
    run = common.rerun(parser, args, always=("repeats", "batch"))
    info = common.machine()
    lines = [*common.heading("Timing on a busy machine: noisy ratios caught, no merging on noise",
                             f"Command: {run}. {torch.get_num_threads()} torch threads, batch {args.batch}, 20 interleaved rounds per timing; "
                             "busy: a `while True: pass` process on one core. Reference "
                             f"`{common.shown(args.model)}` against its training-free ATME 1.5 model.", info=info),
             "| machine | ratios (spread) | noisy | Cait(speedup=1.5): measured | its FLOPs plan | merged tokens | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, part in result.items():
        shown = ", ".join(f"{row['ratio']:.2f}x ({100 * row['ratio_spread']:.0f}%)" for row in part["timings"])
        noisy = sum(row["noisy"] for row in part["timings"])
        kept = part["promise"]
        lines.append(f"| {name} | {shown} | {noisy} of {len(part['timings'])} | {kept['measured']:.2f}x | {kept['planned_flops_speedup']:.2f}x "
                     f"| {kept['merged_tokens']} | {kept['seconds']:.0f} |")
    out = Path(args.out)
    common.write_lines(out / "busy_timing.md", lines, echo=True)
    common.write_json(out / "busy_timing.json", {"machine": info, "command": run.strip("`"), **result})


if __name__ == "__main__":
    main()
