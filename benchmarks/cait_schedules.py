"""Where to merge: the schedule ``--speedup`` plans against other ways of spreading the merges.

Same model, images and measures as ``cait_design.py`` (train images only). Per FLOPs target and
method, rows are:
- the planned schedule (``schedule_for_speedup``: shares weighing depth-1-i for block i);
- other one-number rules, each scaled to just reach the target: an even spread over all blocks
  (the planner before the front-loaded one), an even spread over the first 3 blocks, and shares halving
  from block to block;
- the best of a grid of per-block counts (blocks 0–3, steps of 4; tokens merged early save every
  later block's work, so fewer merges reach the same FLOPs) whose FLOPs speed-up falls within
  ``BAND`` above the target, chosen by KL on the first ``--search-images``.
Every row is measured on the remaining images. ATME uses the lowest level each block allows.

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
RULES = {  # per-block shares of a depth-6 model's five merging blocks
    "even over all blocks": [1, 1, 1, 1, 1],
    "even over blocks 0-2": [1, 1, 1, 0, 0],
    "halving shares": [16, 8, 4, 2, 1],
}


def rule_schedule(method: str, spec, shares: list[int], target: float):
    """The fewest merges, split by ``shares`` with cumulative rounding, that reach ``target`` by
    the FLOPs model (None if no split does)."""
    def counts(total: float) -> list[int]:
        out, done, share = [], 0, 0.0
        for weight in shares:
            share += total * weight / sum(shares)
            out.append(round(share) - done)
            done += out[-1]
        return out

    low, high, found = 0.0, float(spec.num_patches), None
    for _ in range(30):
        middle = (low + high) / 2
        schedule = level_schedule(method, spec.grid_size, [*counts(middle), 0])
        if schedule is not None and predicted_speedup(spec, schedule) >= target:
            high, found = middle, schedule
        else:
            low = middle
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--search-images", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.6, 2.0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cait" / "schedules.md"))
    args = parser.parse_args()

    model, spec, train, batches, reference = study_data(args.model, args.train, args.images)
    split = -(-args.search_images // len(batches[0][0]))
    search, held = (batches[:split], reference[:split]), (batches[split:], reference[split:])
    grid_counts = itertools.product(range(4, 33, 4), range(0, 25, 4), range(0, 17, 4), (0, 4, 8))
    lines = [f"# Merge schedules (train images only)\n\nvit-d6-cifar10, CPU ({platform.machine()}), float32. Grid-search rows chosen "
             f"by KL on {split * len(batches[0][0])} train images; every row measured on {len(train) - split * len(batches[0][0])} others.\n",
             "| target | method | rule | schedule (block, r, level) | tokens merged | FLOPs speed-up | agreement | KL | fidelity (cosine) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    candidates = {method: [] for method in ("tome", "atme")}
    for counts in grid_counts:
        for method in candidates:
            schedule = level_schedule(method, spec.grid_size, [*counts, 0])
            if schedule is not None:
                candidates[method].append((predicted_speedup(spec, schedule), schedule))
    for target in args.targets:
        for method, pool in candidates.items():
            band = [schedule for speedup, schedule in pool if target <= speedup < target + BAND]
            rows = [("planned (shares depth-1-i)", schedule_for_speedup(spec, method, target))]
            rows += [(name, rule_schedule(method, spec, shares, target)) for name, shares in RULES.items()]
            rows.append((f"best of {len(band)} on blocks 0-3", min(band, key=lambda schedule: scored(model, schedule, *search)["kl"])))
            for name, schedule in rows:
                if schedule is None:
                    lines.append(f"| {target:g}x | {method} | {name} | cannot reach the target | | | | | |")
                    continue
                result = scored(model, schedule, *held)
                steps = " ".join(f"({b},{r},{level})" if method == "atme" else f"({b},{r})" for b, r, level in schedule.steps)
                lines.append(f"| {target:g}x | {method} | {name} | {steps} | {schedule.merged} | {predicted_speedup(spec, schedule):.2f}x "
                             f"| {100 * result['agreement']:.2f}% | {result['kl']:.4f} | {result['cosine']:.4f} |")
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
