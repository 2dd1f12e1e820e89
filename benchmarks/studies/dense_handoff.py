"""What dense mode costs per block, and what handing the full map on only where it is read saves.

Dense mode keeps the token grid for a dense head. Until 0.2 every block handed the full
``prefix + H×W`` map to the next, which took the merged tokens back out of it: a gather and a
scatter per block. Now only the blocks whose map something reads do (``full_maps_read``; for a
head on the last layer, the last block alone). This study times, in one interleaved run on
``dinov2-s14`` (batch ``--batch``, 20 rounds), the original against the same ATME schedule
(planned for ``--speedup`` by the FLOPs model) in three modes: classification (merged tokens reach
the head), dense with the full map after every block, and dense with it after the last block
only. Both the classifier (the backbone alone: the issue's "backbone speed-up") and the saliency
model around it are timed, and the saliency maps of the two dense modes are compared.

    .venv/bin/python benchmarks/studies/dense_handoff.py     # about 8 minutes on 2 cores

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and dinov2_saliency

import common
import torch
from dinov2_saliency import MODEL, load_saliency

import vitslim
from vitslim.cait.patch import apply_token_merging, full_maps_read
from vitslim.cait.schedule import schedule_for_speedup

OUT = common.RESULTS / "studies" / "dense_handoff"


def merged(model, schedule, *, dense: bool, full_map_after=None):
    copied = copy.deepcopy(model)
    return apply_token_merging(copied, schedule, dense=dense, full_map_after=full_map_after, record=False)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    classifier = vitslim.load_model(MODEL).eval()
    saliency = load_saliency().eval()
    schedule = schedule_for_speedup(vitslim.describe(classifier), "atme-lattice", args.speedup)
    assert full_maps_read(saliency, schedule) == (), "the saliency decoder reads only the final map"
    rows = {}
    for name, model in (("classifier (backbone)", classifier), ("saliency model", saliency)):
        variants = [("original", model), ("classification mode", merged(model, schedule, dense=False)),
                    ("dense, full map after every block", merged(model, schedule, dense=True)),
                    ("dense, full map after the last block", merged(model, schedule, dense=True, full_map_after=()))]
        if name == "saliency model":
            variants.pop(1)  # its decoder needs the grid: classification mode is no option for it
        results = vitslim.benchmark(variants, batch_size=args.batch, runs=args.runs, progress=False)
        rows[name] = [{"variant": result.model, "ratio": round(result.ratio, 3), "ratio_spread": round(result.ratio_spread, 3),
                       "images_per_s": round(result.images_per_s, 2)} for result in results]
        print(name, [(row["variant"], row["ratio"]) for row in rows[name]], flush=True)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        everywhere = merged(saliency, schedule, dense=True)(images)
        last_only = merged(saliency, schedule, dense=True, full_map_after=())(images)
    difference = float((everywhere - last_only).abs().max())
    run = common.rerun(parser, args, always=("speedup", "batch", "runs"))
    info = common.machine()
    backbone = {row["variant"]: row["ratio"] for row in rows["classifier (backbone)"]}
    lines = [*common.heading("Dense mode: the full map handed on after every block, or only where it is read",
                             f"Command: {run}. dinov2-s14 at 224 (16x16 patches), ATME planned for {args.speedup:g}x by the FLOPs model "
                             f"({schedule.merged} tokens merged), batch {args.batch}, {args.runs} interleaved rounds, eager PyTorch, "
                             f"{torch.get_num_threads()} threads.", info=info)]
    for name, table in rows.items():
        lines += ["", f"**{name}**", "", "| variant | speed-up | ratio spread | images/s |", "|---|---|---|---|"]
        lines += [f"| {row['variant']} | {row['ratio']:.2f}x | {100 * row['ratio_spread']:.0f}% | {row['images_per_s']:.1f} |" for row in table]
    lines += ["", f"Backbone, dense over classification mode: every block {backbone['dense, full map after every block'] / backbone['classification mode']:.3f}, "
              f"last block only {backbone['dense, full map after the last block'] / backbone['classification mode']:.3f}. "
              f"The two dense modes' saliency maps differ by at most {difference:.2g} on 4 random images."]
    out = Path(args.out)
    common.write_lines(out / "dense_handoff.md", lines, echo=True)
    common.write_json(out / "dense_handoff.json", {"machine": info, "command": run.strip("`"), "schedule": schedule.as_dict(),
                                                   "rows": rows, "max_map_difference": difference})


if __name__ == "__main__":
    main()
