"""How many calibration images the low-rank benchmark uses, chosen on held-out *train* images.

Layer-wise compensation is a regression fitted to the calibration tokens, so more images should
fit it better; this measures by how much, without touching the test split. For each calibration
size N (the first N images of the seed-0 permutation of the train split, as
``benchmarks/lowrank.py --calib-images N`` draws them) the model is compressed with vitslim's
defaults (mixed ranks, Fisher weights, compensation) and scored on 5,000 train images that no
calibration set contains (the same permutation after its first 4,096).

    .venv/bin/python benchmarks/studies/lowrank_calibration.py --ratio 0.15 --sizes 256 512 1024 2048

Rows go to ``OUT/results.json`` as they finish (a rerun skips the sizes already measured) and the
table to ``OUT/results.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common

import vitslim
from vitslim.lowrank.compress import compress_lowrank

RESERVED = 4096  # the permutation's first images, from which every calibration set is drawn
HELD_OUT = 5000


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser, test=False)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--out", default=str(common.RESULTS / "lowrank-calibration"))
    args = parser.parse_args()
    if max(args.sizes) > RESERVED:
        parser.error(f"calibration sets are drawn from the first {RESERVED} images, so --sizes must not exceed it")

    model = vitslim.load_model(args.model)
    spec = vitslim.describe(model)
    train = common.open_split(spec, args.train)
    out = Path(args.out)
    rows = common.Rows(out / "results.json")

    def held_out_score(candidate, teacher=None) -> dict:
        return vitslim.evaluate(candidate, args.train, teacher=teacher, limit=HELD_OUT, skip=RESERVED, seed=0, progress=False)

    if not rows.has(size=0):
        rows.add({"size": 0, "ratio": 1.0, "top1": held_out_score(model)["top1"]})
    for size in args.sizes:
        if rows.has(size=size, ratio=args.ratio):
            continue
        calibration = common.image_batches(train, size, 64)
        started = time.perf_counter()
        compressed = compress_lowrank(model, calibration, vitslim.LowRank(param_ratio=args.ratio), progress=False)
        seconds = time.perf_counter() - started
        score = held_out_score(compressed, teacher=model)
        rows.add({"size": size, "ratio": args.ratio, "top1": score["top1"], "agreement": score["agreement"], "kl": score["kl"],
                  "seconds": round(seconds, 1)})
        print(f"{size} images, ratio {args.ratio:g}: held-out top-1 {100 * score['top1']:.2f}%, KL {score['kl']:.4f}", flush=True)

    original = rows.find(size=0)
    lines = [f"Calibration size for low-rank compression, scored on {HELD_OUT} held-out train images (never the test split). "
             f"Command: {common.rerun(parser, args, always=('ratio', 'sizes'))}.",
             "", f"Original on the same images: {100 * original['top1']:.2f}%.", "", common.machine_line(resumed=True), "",
             "| param ratio | calibration images | held-out top-1 | Δ | agreement | KL | compress s |", "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["size"]), key=lambda r: (-r["ratio"], r["size"])):
        lines.append(f"| {r['ratio']:g} | {r['size']} | {100 * r['top1']:.2f}% | {100 * (r['top1'] - original['top1']):+.2f} | "
                     f"{100 * r['agreement']:.2f}% | {r['kl']:.4f} | {r['seconds']:.0f} |")
    common.write_lines(out / "results.md", lines, echo=True)


if __name__ == "__main__":
    main()
