"""Which reading of ATME keeps a dense map best? Each choice against ToMe, on training images only.

Our first reading of ATME (destinations fixed on a sub-grid lattice, ``merge="atme-lattice"``) kept
dinov2-s14's saliency maps worse than ToMe at every speed (docs/dinov2.md). This study varies one
choice at a time within what the CAIT abstract states (asymmetric merging of *neighbouring*
tokens that keeps the spatial structure) and scores each variant's maps against the unmerged
model's: Pearson r per image, IoU of the regions above 0.8, MAE. The choices:

- **destinations**: the lattice reading (first level 1 or 2) against destinations that alternate
  with the sources in the current token order, as in ToMe's bipartite matching, so that merged
  tokens may merge again and uniform regions coarsen over several blocks;
- **neighbourhood**: how far a source may reach, in spacings of the current token map (the grid
  cell scaled by the square root of the patches a token holds), or in fixed grid cells, or
  anywhere (ToMe);
- **split**: sources and destinations alternating in the current order, in raster order of where
  the tokens stand, or on a checkerboard;
- **cost**: the keys' cosine (ToMe's), a size-weighted (Ward) cost that merges small tokens first,
  a pull towards large tokens, or protection of distinctive tokens (a source's mean similarity
  to all destinations added to its score, after PiToMe's energy);
- **reconstruction**: the last blocks run on the full map again (Expedite's reconstruction layer),
  with more merging before to keep the same FLOPs.

Every variant merges the same number of tokens per block, planned by the FLOPs model for the
target over the backbone's blocks at the given concentration (the reconstruction rows merge more
to reach the same FLOPs), so rows at one target cost the same by the FLOPs model. Images: the
first ``--images`` of the ImageNet sample in sorted order, from the dense benchmark's training half
(0-499); the reported half (500-999) chooses nothing.

    .venv/bin/python benchmarks/studies/atme_variants.py

Writes ``--out`` (atme-variants.md) with ``atme-variants.json`` and ``.csv`` beside it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and dinov2

import common
import torch
from common import Column
from dinov2_saliency import training_maps

from vitslim.adapters import describe
from vitslim.cait import merging, patch
from vitslim.cait.flops import blocks_flops
from vitslim.cait.patch import MERGING_ATTR, token_merging
from vitslim.cait.schedule import plan, schedule_for_speedup, tokens_per_block
from vitslim.measure.fidelity import MapFidelity

COLUMNS = (Column("speedup", "FLOPs target", "{:g}x"), Column("concentration", "C", "{:g}"), Column("varied", "varied"),
           Column("variant", "variant"), Column("merged", "tokens merged"), Column("pearson", "Pearson r", "{:.4f}"),
           Column("iou", "IoU@0.8", "{:.3f}"), Column("mae", "MAE", "{:.4f}"))


def variant_merge(tokens, metric, token_map, r, radius=merging.NEIGHBOUR_RADIUS, *, adaptive=True, split="order", cost="cosine",
                  weight=0.0):
    """ATME with one choice changed: ``adaptive`` (radius in spacings of the current map, else in
    grid cells; None: anywhere), ``split`` ("order", "raster", "checker") and ``cost`` ("cosine",
    "ward", "attract", "energy" with ``weight``)."""
    prefix = token_map.prefix
    sources, destinations = merging._bipartite(tokens, token_map, r)
    if r == 0:
        return tokens, token_map
    patches = tokens.shape[1] - prefix
    if split != "order":
        cells = token_map.position
        raster = (cells[..., 0] * token_map.grid[1] + cells[..., 1]).argsort(dim=1)
        if split == "raster":
            sources, destinations = raster[:, 0::2], raster[:, 1::2]
        else:
            rank = torch.empty_like(raster).scatter_(1, raster, torch.arange(patches).expand_as(raster))
            checker = (((rank + cells[..., 0]) % 2) * 2 * patches + rank).argsort(dim=1)
            destinations, sources = checker[:, : patches // 2], checker[:, patches // 2:]
    similarity = merging._cosine(merging._take(metric, sources, prefix), merging._take(metric, destinations, prefix))
    energy = similarity.mean(-1)
    source_size, destination_size = merging._take(token_map.size, sources, prefix), merging._take(token_map.size, destinations, prefix)
    if cost == "ward":
        similarity = -(1 - similarity) * (source_size[:, :, None] * destination_size[:, None, :]
                                          / (source_size[:, :, None] + destination_size[:, None, :]))
    elif cost == "attract":
        similarity = similarity + weight * destination_size.log()[:, None, :]
    if radius is not None:
        reach = radius * (token_map.source.shape[1] / patches) ** 0.5 if adaptive else radius
        allowed = merging.neighbours(merging._take(token_map.position, sources), merging._take(token_map.position, destinations), reach)
        similarity = similarity.masked_fill(~allowed, float("-inf"))
    score, assignment = similarity.max(dim=-1)
    if cost == "energy":
        score = score + weight * energy
    return merging.merge_step(tokens, token_map, destinations, sources, assignment, score, r, level=-1)


def variants():
    """(varied, name, merge kind, ``variant_merge``'s options or None for the kind's own merge, planning options)."""
    yield "baseline", "ToMe", "tome", None, {}
    yield "baseline", f"ATME, radius {merging.NEIGHBOUR_RADIUS:g} spacings (chosen)", "atme", None, {}
    yield "destinations", "lattice reading, first level 1", "atme-lattice", None, {"first_level": 1}
    yield "destinations", "lattice reading, first level 2", "atme-lattice", None, {"first_level": 2}
    for radius in (1.5, 2.0, 4.0):
        yield "neighbourhood", f"radius {radius:g} spacings", "atme", dict(radius=radius), {}
    yield "neighbourhood", "radius 4 grid cells, fixed", "atme", dict(radius=4, adaptive=False), {}
    yield "split", "raster-order split", "atme", dict(split="raster"), {}
    yield "split", "checkerboard split", "atme", dict(split="checker"), {}
    yield "cost", "Ward (size-weighted) cost", "atme", dict(cost="ward"), {}
    yield "cost", "pull to large tokens (0.05 log size)", "atme", dict(cost="attract", weight=0.05), {}
    yield "cost", "protect distinctive tokens (0.5 energy)", "atme", dict(cost="energy", weight=0.5), {}
    yield "reconstruction", "full map again for the last block", "atme", None, {"restore": 10}
    yield "reconstruction", "full map again for the last two blocks", "atme", None, {"restore": 9}


@contextmanager
def merging_with(options: dict | None):
    """ATME's merge replaced by ``variant_merge`` with ``options`` while the block runs (None: as it is)."""
    original = patch.atme_merge
    if options is not None:
        patch.atme_merge = lambda tokens, metric, token_map, r, radius: variant_merge(tokens, metric, token_map, r, **options)
    try:
        yield
    finally:
        patch.atme_merge = original


def restoring_schedule(spec, speedup: float, concentration: float, restore: int):
    """The schedule over blocks 0..``restore`` whose blocks' FLOPs, with every later block on the
    full map, reach ``speedup``; None when merging cannot reach it."""
    depth, full_tokens = len(spec.blocks), spec.num_prefix_tokens + spec.num_patches
    unmerged = blocks_flops(spec, [full_tokens] * depth)

    def reached(schedule):
        counts = [count if block <= restore else full_tokens for block, count in enumerate(tokens_per_block(schedule, spec))]
        return unmerged / blocks_flops(spec, counts)

    low, high = 0.0, float(depth * spec.num_patches)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if reached(plan("atme", spec.grid_size, restore + 1, middle, concentration)) >= speedup else (middle, high)
    schedule = plan("atme", spec.grid_size, restore + 1, high, concentration)
    return schedule if reached(schedule) >= speedup - 1e-3 else None


def restore_after(model, block, index: int):
    """From block ``index`` on, the blocks run on the full token map: the merge state is dropped
    after the block hands the full map on (dense mode hands it on after every block here)."""
    merger = getattr(model, MERGING_ATTR)

    def drop(module, args, output):
        merger.token_map = merger.kept = merger.detail = None

    return block.register_forward_hook(drop)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--images", type=int, default=128, help="First N ImageNet sample images (sorted; all from the training half).")
    parser.add_argument("--out", default=str(common.RESULTS / "dinov2" / "atme-variants.md"))
    args = parser.parse_args()
    model, images, reference = training_maps(args.images)
    spec = describe(model)
    rows = []
    for speedup in (1.5, 2.0, 2.5):
        for concentration in (1.0, 0.0):
            for varied, name, merge, variant, options in variants():
                restore = options.get("restore")
                if restore is not None:
                    schedule = restoring_schedule(spec, speedup, concentration, restore)
                    if schedule is None:
                        continue
                else:
                    schedule = schedule_for_speedup(spec, merge, speedup, concentration=concentration, first_level=options.get("first_level", 1))
                score = MapFidelity(0.8)
                with torch.no_grad(), merging_with(variant), token_merging(model, schedule, dense=True, full_map_after=None):
                    hook = restore_after(model, spec.blocks[restore].module, restore) if restore is not None else None
                    for batch, teacher in zip(images.split(16), reference):
                        score.update(model(batch), teacher)
                    if hook is not None:
                        hook.remove()
                result = score.result()
                rows.append({"speedup": speedup, "concentration": concentration, "varied": varied, "variant": name,
                             "merged": schedule.merged, "schedule": [list(step) for step in schedule.steps],
                             **{key: result[key] for key in ("pearson", "iou", "mae")}})
                print(f"{speedup}x C{concentration:g} {name}: pearson {result['pearson']:.4f} iou {result['iou']:.3f}", flush=True)
    text = (f"Fidelity of dinov2-s14's saliency maps to the unmerged model's, on the first {args.images} ImageNet sample images "
            "(sorted; the dense benchmark's training half), dense mode with each patch's detail kept. Schedules planned by the "
            "FLOPs model over the backbone's blocks at concentration C (no timing); every row of one target and C merges the "
            "same tokens per block, except the reconstruction rows (more merging before the full-map blocks, same FLOPs). "
            f"Command: {common.command(*sys.argv[1:])}")
    lines = [*common.heading("ATME variants on a dense map: destinations, neighbourhood, split, cost, reconstruction", text),
             *common.markdown_table(COLUMNS, rows)]
    common.write_table(Path(args.out), lines, {"rows": (COLUMNS, rows)}, echo=True, images=args.images)


if __name__ == "__main__":
    main()
