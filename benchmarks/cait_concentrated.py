"""Concentrated merge schedules: most of the merging in the first one or two blocks (train images only).

The issue expected neighbour-restricted merging to win where many tokens merge in one block.
The planner never does that (at most half a block's tokens per block, shares spread over every
block but the last), so this study scores hand-written concentrated schedules for ATME and
ToMe beside the planner's, at about the same FLOPs: agreement and KL with the unmerged model,
top-1 on the same train images, and the cosine of the last block's unmerged per-position
features. ToMe cannot merge more than half the tokens in one block (bipartite halves); ATME at
level 2 can merge every token that is not on its 2x2 sub-grid (48 of 64) at once.

    .venv/bin/python benchmarks/cait_concentrated.py --images 2000
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from cait_design import scored, study_data

from vitslim.atomic import atomic_file
from vitslim.cait.patch import MergeSchedule
from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# (block, r, level); ToMe ignores the level
CONCENTRATED = {
    "atme": [((0, 32, 2), (1, 8, 2)), ((0, 24, 2), (1, 16, 2)), ((1, 48, 2),), ((0, 40, 2),), ((0, 32, 1), (1, 16, 2)), ((0, 44, 2),),
             ((0, 48, 2),)],
    "tome": [((0, 32, 1), (1, 8, 1)), ((0, 32, 1), (1, 12, 1), (2, 4, 1)), ((0, 32, 1), (1, 16, 1))],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cait" / "concentrated.md"))
    args = parser.parse_args()
    model, spec, _, batches, reference = study_data(args.model, args.train, args.images)
    schedules = [("planner", schedule_for_speedup(spec, method, target)) for target in (2.0, 2.4) for method in ("tome", "atme")]
    schedules += [("concentrated", MergeSchedule(method, steps)) for method, options in CONCENTRATED.items() for steps in options]
    rows = []
    for origin, schedule in schedules:
        result = scored(model, schedule, batches, reference)
        rows.append((predicted_speedup(spec, schedule, spec), origin, schedule, result))
        print(f"{schedule.method} {origin} {schedule.steps}: {rows[-1][0]:.2f}x, agreement {100 * result['agreement']:.2f}%", flush=True)
    lines = [
        "# Concentrated merge schedules (train images only)",
        "",
        f"Command: `.venv/bin/python benchmarks/cait_concentrated.py --images {args.images}`. {args.images} CIFAR-10 *train* images "
        f"(seed 123), vit-d6-cifar10, CPU ({platform.processor() or platform.machine()}), float32. Sorted by the FLOPs model's speed-up.",
        "",
        "| method | schedule | steps (block, r, level) | FLOPs speed-up | agreement | KL | top-1 | fidelity (cosine) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for speedup, origin, schedule, result in sorted(rows, key=lambda row: row[0]):
        steps = " ".join(f"({b},{r},{level})" if schedule.method == "atme" else f"({b},{r})" for b, r, level in schedule.steps)
        lines.append(f"| {'ATME' if schedule.method == 'atme' else 'ToMe'} | {origin} | {steps} | {speedup:.2f}x | "
                     f"{100 * result['agreement']:.2f}% | {result['kl']:.4f} | {100 * result['top1']:.2f}% | {result['cosine']:.4f} |")
    atomic_file(Path(args.out), lambda partial: partial.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
