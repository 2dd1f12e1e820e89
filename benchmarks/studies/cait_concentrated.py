"""Concentrated merge schedules: most of the merging in the first one or two blocks (train images only).

The issue expected neighbour-restricted merging to win where many tokens merge in one block.
The planner never does that (at most half a block's tokens per block, shares spread over every
block but the last), so this study scores hand-written concentrated schedules for ATME and
ToMe beside the planner's, at about the same FLOPs: agreement and KL with the unmerged model,
top-1 on the same train images, and the cosine of the last block's unmerged per-position
features. ToMe cannot merge more than half the tokens in one block (bipartite halves); ATME at
level 2 can merge every token that is not on its 2x2 sub-grid (48 of 64) at once.

    .venv/bin/python benchmarks/studies/cait_concentrated.py --images 2000

Writes ``--out`` (concentrated.md) with its data beside it: ``concentrated.json`` (the rows and
the machine) and ``concentrated.csv`` (the rows).

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
from cait_design import METHOD_NAMES, SCHEDULE, SCORES, schedule_row, scored, study_data
from common import Column

from vitslim.cait.patch import MergeSchedule
from vitslim.cait.schedule import schedule_for_speedup

# (block, r, level); ToMe ignores the level
CONCENTRATED = {
    "atme-lattice": [((0, 32, 2), (1, 8, 2)), ((0, 24, 2), (1, 16, 2)), ((1, 48, 2),), ((0, 40, 2),), ((0, 32, 1), (1, 16, 2)), ((0, 44, 2),),
             ((0, 48, 2),)],
    "tome": [((0, 32, 1), (1, 8, 1)), ((0, 32, 1), (1, 12, 1), (2, 4, 1)), ((0, 32, 1), (1, 16, 1))],
}
COLUMNS = (Column("method", "method"), Column("origin", "schedule"), Column(SCHEDULE.key, "steps (block, r, level)"), *SCORES)


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser, test=False)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", default=str(common.RESULTS / "cait" / "concentrated.md"))
    args = parser.parse_args()
    model, spec, _, batches, reference = study_data(args.model, args.train, args.images)
    schedules = [("planner", schedule_for_speedup(spec, method, target)) for target in (2.0, 2.4) for method in ("tome", "atme-lattice")]
    schedules += [("concentrated", MergeSchedule(method, steps)) for method, options in CONCENTRATED.items() for steps in options]
    rows = []
    for origin, schedule in schedules:
        rows.append(schedule_row(spec, schedule, scored(model, schedule, batches, reference), method=METHOD_NAMES[schedule.merge], origin=origin))
        print(f"{schedule.merge} {origin} {schedule.steps}: {rows[-1]['flops_speedup']:.2f}x, agreement {100 * rows[-1]['agreement']:.2f}%",
              flush=True)
    rows.sort(key=lambda row: row["flops_speedup"])
    command = common.rerun(parser, args, always=("images",))
    lines = [*common.heading("Concentrated merge schedules (train images only)",
                             f"Command: {command}. {args.images} CIFAR-10 *train* images (seed 123), vit-d6-cifar10, float32. "
                             "Sorted by the FLOPs model's speed-up."),
             *common.markdown_table(COLUMNS, rows)]
    common.write_table(args.out, lines, {"rows": (COLUMNS, rows)}, echo=True, command=command.strip("`"))


if __name__ == "__main__":
    main()
