"""How ATME's design choices were made: neighbourhood radius and level policy, against ToMe.

Everything here runs on *train* images of vit-d6-cifar10 (a fixed random subset), never on the
test split the CAIT benchmark reports on. ToMe and ATME are planned for the same FLOPs target
(their per-block counts come out equal wherever ATME's grid allows), so mostly the merging rule
differs. Columns:
agreement of top-1 predictions with the unmerged model, mean KL divergence from its output
distribution, top-1 against the labels, and spatial fidelity (mean cosine of the last block's
per-position features after ``unmerge``).

A second part gives each method its *own* best schedule instead of shared counts: a greedy
search adds 4 or 8 merges to whichever block costs the least KL divergence per FLOP saved,
scored on the first ``--search-images`` of those images, and the schedules it passes through
are then measured on the rest (so the search is not graded on the images it chose by). ATME may
merge more than half of a block's tokens there (its sub-grid allows three quarters at level 2),
which ToMe's bipartite matching cannot: the case where neighbour-restricted merging should win.

    .venv/bin/python benchmarks/studies/cait_design.py --images 4000 --search-images 1000

Writes ``--out`` (design.md) and ``--search-out`` (design-search.md), each with its data beside
it: ``.json`` (the rows and the machine) and ``.csv`` (the rows).

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import torch
from common import Column

import vitslim
from vitslim.adapters import describe
from vitslim.cait import merging
from vitslim.cait.patch import MergeSchedule, apply_token_merging, remove_token_merging
from vitslim.cait.schedule import mergeable, predicted_speedup, schedule_for_speedup, top_level
from vitslim.io import image_batches

GLOBAL = 10_000  # a radius no grid reaches: fixed sub-grid destinations, no spatial restriction
# the columns every study of merge schedules reports, each row's scores from ``measure``
SCHEDULE = Column("schedule", "schedule (block, r, level)")
SCORES = (Column("flops_speedup", "FLOPs speed-up", "{:.2f}x"), Column("agreement", "agreement", "{:.2%}"),
          Column("kl", "KL", "{:.4f}"), Column("top1", "top-1", "{:.2%}"), Column("cosine", "fidelity (cosine)", "{:.4f}"))
DESIGN_COLUMNS = (Column("target", "target", "{}x"), Column("variant", "variant"), SCHEDULE, *SCORES)
SEARCH_COLUMNS = (Column("method", "method"), SCHEDULE, *SCORES)
METHOD_NAMES = {"atme-lattice": "ATME", "tome": "ToMe"}


def first_emptied_levels(grid: tuple[int, int], counts: list[tuple[int, int]]) -> MergeSchedule:
    """The level policy before this study: move up a level only once the current one has no
    token left off its grid, clipping the block's count meanwhile (so it merges fewer tokens:
    see its FLOPs column)."""
    patches, level, steps = grid[0] * grid[1], 1, []
    for block, wanted in counts:
        while mergeable("atme-lattice", patches, grid, level) == 0:
            level += 1
        r = min(wanted, mergeable("atme-lattice", patches, grid, level))
        steps.append((block, r, level))
        patches -= r
    return MergeSchedule("atme-lattice", tuple(steps))


def level_schedule(method: str, grid: tuple[int, int], counts: list[int]) -> MergeSchedule | None:
    """Per-block merge counts as a schedule (ATME at the lowest level each block allows), or
    None when a block cannot merge that many."""
    patches, level, steps = grid[0] * grid[1], 1, []
    for block, r in enumerate(counts):
        if r == 0:
            continue
        if method == "atme-lattice":
            while mergeable("atme-lattice", patches, grid, level) < r:
                if level >= top_level(grid):
                    return None
                level += 1
        elif r > mergeable("tome", patches, grid, level):
            return None
        steps.append((block, r, level))
        patches -= r
    return MergeSchedule(method, tuple(steps))


def search_schedules(model, spec, method: str, batches, reference, until: float) -> list[MergeSchedule]:
    """Greedy: from no merging, repeatedly add 4 or 8 merges to the block where they cost the
    least KL per unit of time saved (by the FLOPs model), until the FLOPs speed-up passes ``until``
    or every addition would leave a later block more merges than it can make."""
    counts, kl, speedup, path = [0] * (len(spec.blocks) - 1), 0.0, 1.0, []
    while speedup < until:
        best = None
        for block in range(len(counts)):
            for extra in (4, 8):
                trial = list(counts)
                trial[block] += extra
                schedule = level_schedule(method, spec.grid_size, trial)
                if schedule is None:
                    continue
                trial_speedup = predicted_speedup(spec, schedule)
                trial_kl = scored(model, schedule, batches, reference)["kl"]
                cost = (trial_kl - kl) / (1 / speedup - 1 / trial_speedup)
                if best is None or cost < best[0]:
                    best = (cost, trial, schedule, trial_speedup, trial_kl)
        if best is None:
            break
        _, counts, schedule, speedup, kl = best
        path.append(schedule)
        print(f"search {method}: {speedup:.2f}x {schedule.steps} KL {kl:.4f}", flush=True)
    return path


def scored(model, schedule: MergeSchedule, batches, reference) -> dict:
    """``measure`` with ``schedule`` applied for the duration."""
    apply_token_merging(model, schedule, record=False)
    result = measure(model, batches, reference)
    remove_token_merging(model)
    return result


def measure(model, batches, reference) -> dict:
    """Agreement and mean KL with the unmerged model's logits, top-1 against the labels, and the
    mean cosine of the last block's unmerged per-position features with the unmerged model's."""
    agree = top1 = kl = count = 0
    cosines = []
    prefix = describe(model).num_prefix_tokens
    for (images, labels), (logits_ref, features_ref) in zip(batches, reference):
        logits, features = common.logits_and_features(model, images)
        cosines.append(torch.nn.functional.cosine_similarity(features, features_ref, dim=-1)[:, prefix:].mean(1))
        agree += (logits.argmax(-1) == logits_ref.argmax(-1)).sum().item()
        top1 += (logits.argmax(-1) == labels).sum().item()
        kl += torch.nn.functional.kl_div(logits.log_softmax(-1), logits_ref.log_softmax(-1), log_target=True, reduction="sum").item()
        count += len(labels)
    return {"agreement": agree / count, "kl": kl / count, "top1": top1 / count, "cosine": torch.cat(cosines).mean().item()}


def schedule_row(spec, schedule: MergeSchedule, result: dict, **labels) -> dict:
    """A table row: ``labels``, the schedule's steps and FLOPs speed-up, and ``measure``'s scores."""
    return {**labels, "schedule": common.steps_text(schedule.merge, schedule.steps), "flops_speedup": predicted_speedup(spec, schedule), **result}


def study_data(model_name: str, train_path: str, images: int):
    """The model, its spec, ``images`` seeded train images in batches of 250, and the unmerged
    model's logits and last-block features on each batch."""
    model = vitslim.load_model(model_name)
    spec = describe(model)
    train = image_batches.select(common.open_split(spec, train_path), limit=images, seed=123)
    batches = [(images, labels) for images, labels, _ in image_batches.make_loader(train, 250)]
    reference = [common.logits_and_features(model, images) for images, _ in batches]
    return model, spec, train, batches, reference


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser, test=False)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.6, 2.0, 2.4])
    parser.add_argument("--search-images", type=int, default=1000, help="images the schedule search scores on (0: skip the search)")
    parser.add_argument("--out", default=str(common.RESULTS / "cait" / "design.md"))
    parser.add_argument("--search-out", default=str(common.RESULTS / "cait" / "design-search.md"),
                        help="the search's table (it does not depend on the planner, so the first part can be rerun alone)")
    args = parser.parse_args()

    default_radius = merging.NEIGHBOURHOOD
    model, spec, train, batches, reference = study_data(args.model, args.train, args.images)

    rows = []
    for target in args.targets:
        tome = schedule_for_speedup(spec, "tome", target)
        counts = [(block, r) for block, r, _ in tome.steps]
        atme = schedule_for_speedup(spec, "atme-lattice", target)
        variants = [("ToMe", tome, None), ("ATME, radius 1, levels moved up only when emptied", first_emptied_levels(spec.grid_size, counts), 1)]
        variants += [(f"ATME, radius {radius if radius != GLOBAL else 'global'}", atme, radius) for radius in (1, 2, 3, GLOBAL)]
        for name, schedule, radius in variants:
            if radius is not None:
                merging.NEIGHBOURHOOD = radius
            rows.append(schedule_row(spec, schedule, scored(model, schedule, batches, reference), target=target, variant=name))
            print(common.markdown_table(DESIGN_COLUMNS, rows[-1:])[-1], flush=True)
    merging.NEIGHBOURHOOD = default_radius
    command = common.rerun(parser, args, always=("images", "search_images"))
    lines = [*common.heading("ATME design study (train images only)",
                             f"{len(train)} CIFAR-10 *train* images (seed 123), vit-d6-cifar10, float32. Each target's schedules come from "
                             f"the FLOPs model; the old level policy is fed ToMe's counts and clips them. Command: {command}."),
             *common.markdown_table(DESIGN_COLUMNS, rows)]
    common.write_table(args.out, lines, {"rows": (DESIGN_COLUMNS, rows)}, command=command.strip("`"))

    if args.search_images:
        batch_images = len(batches[0][0])
        split = -(-args.search_images // batch_images)
        rows = [schedule_row(spec, schedule, scored(model, schedule, batches[split:], reference[split:]), method=METHOD_NAMES[method])
                for method in ("tome", "atme-lattice")
                for schedule in search_schedules(model, spec, method, batches[:split], reference[:split], max(args.targets))]
        lines = [*common.heading("Each method's own schedule (train images only)",
                                 f"{len(train)} CIFAR-10 *train* images (seed 123), vit-d6-cifar10. Greedy search (KL per FLOP saved, "
                                 f"steps of 4 or 8 merges) scored on the first {split * batch_images} images; every schedule it passes "
                                 f"through measured on the other {len(train) - split * batch_images}. Command: {command}."),
                 *common.markdown_table(SEARCH_COLUMNS, rows)]
        common.write_table(args.search_out, lines, {"rows": (SEARCH_COLUMNS, rows)}, command=command.strip("`"))


if __name__ == "__main__":
    main()
