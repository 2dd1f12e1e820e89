"""Where to merge: front-loaded merge schedules against the even spread ``--speedup`` plans.

Same model, images and measures as ``cait_design.py`` (train images only). For each FLOPs target
band, every schedule of a grid of per-block counts (blocks 0–3, steps of 4; tokens merged early
save every later block's work, so fewer merges reach the same FLOPs) is scored by KL on the
first ``--search-images``; each method's best one is then measured on the rest, next to the
schedule ``schedule_for_speedup`` plans today (even spread from the first block). ATME uses the
lowest level each block allows.

    .venv/bin/python benchmarks/cait_schedules.py --images 4000 --search-images 1000
"""

from __future__ import annotations

import argparse
import itertools
import platform
from pathlib import Path

from cait_design import ROOT, SHARED, level_schedule, scored, study_data

from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup

BAND = 0.1  # a target band: FLOPs speed-ups from the target to the target + BAND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--search-images", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.6, 2.0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cait" / "schedules.md"))
    args = parser.parse_args()

    model, spec, train, batches, reference = study_data(args.model, args.train, args.images)
    split = -(-args.search_images // len(batches[0][0]))
    search, held = (batches[:split], reference[:split]), (batches[split:], reference[split:])
    grid_counts = itertools.product(range(4, 33, 4), range(0, 25, 4), range(0, 17, 4), (0, 4, 8))
    lines = [f"# Front-loaded merge schedules (train images only)\n\nvit-d6-cifar10, CPU ({platform.machine()}), float32. Best schedule per method "
             f"and FLOPs band chosen by KL on {split * len(batches[0][0])} train images; every row measured on {len(train) - split * len(batches[0][0])} others.\n",
             "| target band | method | schedule (block, r, level) | tokens merged | FLOPs speed-up | agreement | KL | fidelity (cosine) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    candidates = {method: [] for method in ("tome", "atme")}
    for counts in grid_counts:
        for method in candidates:
            schedule = level_schedule(method, spec.grid_size, [*counts, 0])
            if schedule is not None:
                candidates[method].append((predicted_speedup(spec, schedule), schedule))
    for target in args.targets:
        for method, pool in candidates.items():
            band = [schedule for speedup, schedule in pool if target <= speedup < target + BAND]
            best = min(band, key=lambda schedule: scored(model, schedule, *search)["kl"])
            even = schedule_for_speedup(spec, method, target)
            for name, schedule in ((f"{method}, front-loaded (best of {len(band)})", best), (f"{method}, even (planned today)", even)):
                result = scored(model, schedule, *held)
                steps = " ".join(f"({b},{r},{level})" if method == "atme" else f"({b},{r})" for b, r, level in schedule.steps)
                lines.append(f"| {target:g}–{target + BAND:g}x | {name} | {steps} | {schedule.merged} | {predicted_speedup(spec, schedule):.2f}x "
                             f"| {100 * result['agreement']:.2f}% | {result['kl']:.4f} | {result['cosine']:.4f} |")
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
