"""Where to merge: the schedule ``--speedup`` plans against other ways of spreading the merges.

Same model, images and measures as ``cait_design.py`` beside it (train images only). Per FLOPs target and
method, rows are:
- the planned schedule (``schedule_for_speedup``: shares weighing depth-1-i for block i);
- other one-number rules, each scaled to just reach the target: an even spread over all blocks
  (the planner before the front-loaded one), an even spread over the first 3 blocks, and shares halving
  from block to block;
- the best of a grid of per-block counts (blocks 0–3, steps of 4; tokens merged early save every
  later block's work, so fewer merges reach the same FLOPs) whose FLOPs speed-up falls within
  ``BAND`` above the target, chosen by KL on the first ``--search-images``.
Every row is measured on the remaining images. ATME uses the lowest level each block allows.

    .venv/bin/python benchmarks/studies/cait_schedules.py --images 4000 --search-images 1000

Writes ``--out`` (schedules.md) with its data beside it: ``schedules.json`` (the rows and the
machine) and ``schedules.csv`` (the rows).

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
from cait_design import SCHEDULE, SCORES, level_schedule, schedule_row, scored, study_data
from common import Column

from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup

BAND = 0.1  # a target band: FLOPs speed-ups from the target to the target + BAND
RULES = {  # per-block shares of a depth-6 model's five merging blocks
    "even over all blocks": [1, 1, 1, 1, 1],
    "even over blocks 0-2": [1, 1, 1, 0, 0],
    "halving shares": [16, 8, 4, 2, 1],
}
COLUMNS = (Column("target", "target", "{:g}x"), Column("method", "method"), Column("rule", "rule"),
           Column(SCHEDULE.key, SCHEDULE.header, missing="cannot reach the target"), Column("tokens_merged", "tokens merged"),
           *(column for column in SCORES if column.key != "top1"))


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
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser, test=False)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--search-images", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.6, 2.0])
    parser.add_argument("--out", default=str(common.RESULTS / "cait" / "schedules.md"))
    args = parser.parse_args()

    model, spec, train, batches, reference = study_data(args.model, args.train, args.images)
    split = -(-args.search_images // len(batches[0][0]))
    search, held = (batches[:split], reference[:split]), (batches[split:], reference[split:])
    grid_counts = itertools.product(range(4, 33, 4), range(0, 25, 4), range(0, 17, 4), (0, 4, 8))
    table = []
    candidates = {method: [] for method in ("tome", "atme-lattice")}
    for counts in grid_counts:
        for method in candidates:
            schedule = level_schedule(method, spec.grid_size, [*counts, 0])
            if schedule is not None:
                candidates[method].append((predicted_speedup(spec, schedule), schedule))
    for target in args.targets:
        for method, pool in candidates.items():
            band = [schedule for speedup, schedule in pool if target <= speedup < target + BAND]
            rules = [("planned (shares depth-1-i)", schedule_for_speedup(spec, method, target))]
            rules += [(name, rule_schedule(method, spec, shares, target)) for name, shares in RULES.items()]
            rules.append((f"best of {len(band)} on blocks 0-3", min(band, key=lambda schedule: scored(model, schedule, *search)["kl"])))
            for name, schedule in rules:
                labels = {"target": target, "method": method, "rule": name}
                if schedule is None:
                    table.append(labels)
                else:
                    table.append(schedule_row(spec, schedule, scored(model, schedule, *held), **labels, tokens_merged=schedule.merged))
                print(common.markdown_table(COLUMNS, table[-1:])[-1], flush=True)
    command = common.rerun(parser, args, always=("images", "search_images"))
    lines = [*common.heading("Merge schedules (train images only)",
                             f"vit-d6-cifar10, float32. Grid-search rows chosen by KL on {split * len(batches[0][0])} train images; every "
                             f"row measured on {len(train) - split * len(batches[0][0])} others. Command: {command}."),
             *common.markdown_table(COLUMNS, table)]
    common.write_table(args.out, lines, {"rows": (COLUMNS, table)}, command=command.strip("`"))


if __name__ == "__main__":
    main()
