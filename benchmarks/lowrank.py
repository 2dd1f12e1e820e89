"""Low-rank sweep on a reference ViT: test top-1 against parameter ratio for each variant.

Calibration uses train images only (a seeded subset); accuracy is reported on the test split.

    .venv/bin/python benchmarks/lowrank.py --ratios 0.15 0.10 --variants mixed svd uniform --out benchmarks/results/lowrank

Variants: mixed (whitened SVD, fisher-weighted mixed ranks), mixed+comp (the same plus layer-wise
error compensation, vitslim's default: fc2 fitted to the block's output), mixed+comp-layer (the same
with 0.3's layer target), mixed+comp-auto (the target chosen per model on held-out calibration
images, ``compensation_target="auto"``), mixed+comp+kd1 (then one epoch of KD fine-tuning on the
whole train split), mixed-plain (whitened, unweighted normalised energy), uniform (whitened,
uniform ranks), svd, asvd (baselines, mixed, unweighted).

Rows are saved to ``--out/results.json`` as they finish; a rerun with the same ``--out`` skips the
(variant, ratio) pairs already there, so a long sweep resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import common

import vitslim
from vitslim.io.recipe import find_step
from vitslim.lowrank.compress import compress_lowrank
from vitslim.measure.metrics import count_params

# name: (config class, its settings besides the parameter budget)
VARIANTS = {
    "mixed": (vitslim.LowRank, dict(allocation="mixed", sensitivity="fisher", compensation=False)),
    "mixed+comp": (vitslim.LowRank, dict(allocation="mixed", sensitivity="fisher", compensation=True)),
    "mixed+comp-layer": (vitslim.LowRank, dict(allocation="mixed", sensitivity="fisher", compensation=True, compensation_target="layer")),
    "mixed+comp-auto": (vitslim.LowRank, dict(allocation="mixed", sensitivity="fisher", compensation=True, compensation_target="auto")),
    "mixed+comp+kd1": (vitslim.LowRank, dict(allocation="mixed", sensitivity="fisher", compensation=True)),
    "mixed-plain": (vitslim.LowRank, dict(allocation="mixed", sensitivity="none", compensation=False)),
    "uniform": (vitslim.LowRank, dict(allocation="uniform", sensitivity="none", compensation=False)),
    "svd": (vitslim.SVD, dict(allocation="mixed", sensitivity="none")),
    "asvd": (vitslim.ASVD, dict(allocation="mixed", sensitivity="none")),
}


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4, 0.3, 0.15, 0.10])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the +kd1 variant's KD epoch")
    parser.add_argument("--out", default=str(common.RESULTS / "lowrank"))
    args = parser.parse_args()

    model = vitslim.load_model(args.model)
    spec = vitslim.describe(model)
    train = common.open_split(spec, args.train)
    calibration = common.image_batches(train, args.calib_images, 64)
    test = common.open_split(spec, args.test)
    out = Path(args.out)
    rows = common.Rows(out / "results.json")
    if not rows.has(variant="original"):
        original = vitslim.evaluate(model, test, limit=args.eval_limit)
        rows.add({"variant": "original", "ratio": 1.0, "params": count_params(model), "top1": original["top1"], "seconds": 0.0,
                  "images": original["images"]})
    original = rows.find(variant="original")
    print(f"original: top-1 {100 * original['top1']:.2f}% on {original['images']} test images", flush=True)
    for ratio in args.ratios:
        for variant in args.variants:
            if rows.has(variant=variant, ratio=ratio):
                continue
            started = time.perf_counter()
            method, settings = VARIANTS[variant]
            compressed = compress_lowrank(model, calibration, method(param_ratio=ratio, **settings), progress=False)
            if variant.endswith("+kd1"):
                vitslim.distill(compressed, model, train, vitslim.Training(epochs=1, lr=args.lr, progress=False))
            seconds = time.perf_counter() - started
            result = vitslim.evaluate(compressed, test, limit=args.eval_limit, teacher=model)
            step = find_step(compressed, "lowrank") or {}
            chosen = {key: step[key] for key in ("compensation_target", "compensation_target_scores") if key in step}
            rows.add({"variant": variant, "ratio": ratio, "params": count_params(compressed), "top1": result["top1"],
                      "agreement": result["agreement"], "seconds": seconds, **chosen})
            print(f"{variant:14s} ratio {ratio:.2f}: top-1 {100 * result['top1']:.2f}%  ({seconds:.0f} s to compress)", flush=True)
            write(out, rows, args)


def label(row: dict) -> str:
    """The variant, with the target ``compensation_target="auto"`` chose and its held-out KL per target."""
    scores = row.get("compensation_target_scores")
    if not scores:
        return row["variant"]
    return f"{row['variant']} (chose {row['compensation_target']}; held-out KL " + ", ".join(f"{t} {v:.4f}" for t, v in scores.items()) + ")"


def write(out: Path, rows: common.Rows, args) -> None:
    """results.md and results.png from every row (results.json is written as each row lands)."""
    plt = common.pyplot()
    original = rows.find(variant="original")
    lines = [f"Model `{common.shown(args.model)}`; calibration: {args.calib_images} train images (seed 0); top-1 on {original['images']} test images; "
             f"KD: 1 epoch over the train split, lr {args.lr}.", "", common.machine_line(resumed=True), "",
             "| variant | param ratio | params | top-1 | agreement | compress s |", "|---|---|---|---|---|---|"]
    rows = [original, *sorted((r for r in rows if r is not original), key=lambda r: (-r["ratio"], list(VARIANTS).index(r["variant"])))]
    lines += [f"| {label(r)} | {r['ratio']:.2f} | {r['params']:,} | {100 * r['top1']:.2f}% | "
              f"{100 * r['agreement']:.2f}% | {r['seconds']:.0f} |" if "agreement" in r else
              f"| {r['variant']} | 1.00 | {r['params']:,} | {100 * r['top1']:.2f}% | - | - |" for r in rows]
    common.write_lines(out / "results.md", lines)
    fig, axis = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows[1:]):
        points = sorted((r["ratio"], 100 * r["top1"]) for r in rows if r["variant"] == variant)
        axis.plot(*zip(*points), marker="o", label=variant)
    axis.axhline(100 * rows[0]["top1"], color="black", linestyle="--", linewidth=0.8, label="original")
    axis.set(xlabel="parameter ratio (whole model)", ylabel="test top-1 (%)", title="low-rank compression")
    axis.legend()
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
