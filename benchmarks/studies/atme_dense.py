"""Which merge-schedule shape keeps a dense map best, and what dense mode's kept detail is worth?

On dinov2-s14's saliency model (``benchmarks/dinov2.py``'s ``SaliencyModel``), each merging method is
planned by the FLOPs model for 1.5x and 2.0x the backbone's blocks and scored against the unmerged
model's maps: Pearson r per image, IoU of the regions above 0.8, MAE. Rows vary one design choice
at a time: the schedule's concentration (0 = even spread), ATME's first sub-grid level, ATME's
neighbourhood radius, and dense mode with or without each patch's kept detail (plain unmerging).
Images: the first ``--images`` of the ImageNet sample in sorted order, i.e. from the dense
benchmark's *training* half (0-499); the reported half (500-999) chooses nothing.

    .venv/bin/python benchmarks/studies/atme_dense.py

Writes ``--out`` (atme-dense.md) with ``atme-dense.json`` and ``atme-dense.csv`` beside it.

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and dinov2

import common
import torch
from common import Column
from dinov2_saliency import training_maps

from vitslim.adapters import describe
from vitslim.cait import merging
from vitslim.cait.patch import token_merging
from vitslim.cait.schedule import schedule_for_speedup
from vitslim.measure.fidelity import MapFidelity

COLUMNS = (Column("speedup", "FLOPs target", "{:g}x"), Column("method", "method"), Column("varied", "varied"),
           Column("concentration", "concentration", "{:g}"), Column("first_level", "first level"),
           Column("neighbourhood", "radius"), Column("detail", "detail kept"),
           Column("pearson", "Pearson r", "{:.4f}"), Column("iou", "IoU@0.8", "{:.3f}"), Column("mae", "MAE", "{:.4f}"))


def variants():
    """(varied, method, concentration, first_level, neighbourhood, detail): the baseline of each
    method, then one choice changed at a time."""
    base = dict(concentration=1.0, first_level=1, neighbourhood=merging.NEIGHBOURHOOD, detail=True)
    for method in ("atme-lattice", "tome", "window"):
        yield "baseline", method, base
        if method == "window":
            continue
        for concentration in (0.0, 2.0, 4.0):
            yield "concentration", method, {**base, "concentration": concentration}
        yield "detail", method, {**base, "detail": False}
    for first_level in (2, 3):
        yield "first level", "atme-lattice", {**base, "first_level": first_level}
        yield "first level", "atme-lattice", {**base, "first_level": first_level, "concentration": 0.0}
    for radius in (1, 4, 8):
        yield "radius", "atme-lattice", {**base, "neighbourhood": radius}


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--images", type=int, default=64, help="First N ImageNet sample images (sorted; all from the training half).")
    parser.add_argument("--out", default=str(common.RESULTS / "dinov2" / "atme-dense.md"))
    args = parser.parse_args()
    model, images, reference = training_maps(args.images)
    spec = describe(model)
    rows = []
    default_radius = merging.NEIGHBOURHOOD
    for speedup in (1.5, 2.0):
        for varied, method, choice in variants():
            merging.NEIGHBOURHOOD = choice["neighbourhood"]
            schedule = schedule_for_speedup(spec, method, speedup, concentration=choice["concentration"], first_level=choice["first_level"])
            score = MapFidelity(0.8)
            with torch.no_grad(), token_merging(model, schedule, detail=choice["detail"]):
                for batch, teacher in zip(images.split(16), reference):
                    score.update(model(batch), teacher)
            merging.NEIGHBOURHOOD = default_radius
            result = score.result()
            rows.append({"speedup": speedup, "method": method, "varied": varied, **choice,
                         "neighbourhood": choice["neighbourhood"] if method == "atme-lattice" else None,
                         "first_level": choice["first_level"] if method == "atme-lattice" else None,
                         "schedule": [list(step) for step in schedule.steps],
                         **{key: result[key] for key in ("pearson", "iou", "mae")}})
            print(f"{speedup}x {method} {varied}: {choice} -> pearson {result['pearson']:.4f} iou {result['iou']:.3f}", flush=True)
    text = ("Fidelity of the saliency maps to the unmerged model's, on the first "
            f"{args.images} ImageNet sample images (sorted; the dense benchmark's training half). Schedules planned by the "
            "FLOPs model for the target over the backbone's blocks (no timing). One design choice varied per row against each "
            f"method's baseline (concentration 1, ATME first level 1, radius {default_radius} sub-grid steps, detail kept). "
            f"Command: {common.command(*sys.argv[1:])}")
    lines = [*common.heading("ATME on a dense map: schedule shape, first level, radius, kept detail", text),
             *common.markdown_table(COLUMNS, rows)]
    common.write_table(Path(args.out), lines, {"rows": (COLUMNS, rows)}, echo=True, images=args.images)

if __name__ == "__main__":
    main()
