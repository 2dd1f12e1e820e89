"""Low-rank sweep on a reference ViT: test top-1 against parameter ratio for each variant.

Calibration uses train images only (a seeded subset); accuracy is reported on the test split.

    .venv/bin/python benchmarks/lowrank.py --ratios 0.15 0.10 --variants mixed svd uniform --out benchmarks/results/lowrank

Variants: mixed (whitened SVD, fisher-weighted mixed ranks), mixed+comp (the same plus layer-wise
error compensation, vitslim's default), mixed+comp+kd1 (then one epoch of KD fine-tuning on the
whole train split), mixed-plain (whitened, unweighted normalised energy), uniform (whitened,
uniform ranks), svd, asvd (baselines, mixed, unweighted).

Rows are saved to ``--out/results.json`` as they finish; a rerun with the same ``--out`` skips the
(variant, ratio) pairs already there, so a long sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import vitslim
from vitslim import data as imagedata
from vitslim.atomic import atomic_file
from vitslim.lowrank.compress import compress_lowrank
from vitslim.metrics import count_params

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS = {
    "mixed": dict(method="whitened", allocation="mixed", sensitivity="fisher", compensation=False),
    "mixed+comp": dict(method="whitened", allocation="mixed", sensitivity="fisher", compensation=True),
    "mixed+comp+kd1": dict(method="whitened", allocation="mixed", sensitivity="fisher", compensation=True),
    "mixed-plain": dict(method="whitened", allocation="mixed", sensitivity="none", compensation=False),
    "uniform": dict(method="whitened", allocation="uniform", sensitivity="none", compensation=False),
    "svd": dict(method="svd", allocation="mixed", sensitivity="none"),
    "asvd": dict(method="asvd", allocation="mixed", sensitivity="none"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg" / "test.zip"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4, 0.3, 0.15, 0.10])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lowrank"))
    args = parser.parse_args()

    model = vitslim.load_model(args.model)
    spec = vitslim.describe(model)
    transform = imagedata.build_transform(spec.preprocessing)
    train = imagedata.open_images(args.train, transform, class_names=spec.label_names)
    calibration = [images for images, _, _ in imagedata.make_loader(imagedata.select(train, limit=args.calib_images, seed=0), 64)]
    test = imagedata.open_images(args.test, transform, class_names=spec.label_names)
    out = Path(args.out)
    done = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    rows = [r for r in done if r["variant"] == "original"]
    if not rows:
        original = vitslim.evaluate(model, test, limit=args.eval_limit)
        rows = [{"variant": "original", "ratio": 1.0, "params": count_params(model), "top1": original["top1"], "seconds": 0.0, "images": original["images"]}]
    print(f"original: top-1 {100 * rows[0]['top1']:.2f}% on {rows[0]['images']} test images", flush=True)
    rows += [r for r in done if r["variant"] != "original"]
    for ratio in args.ratios:
        for variant in args.variants:
            if any(r["variant"] == variant and r["ratio"] == ratio for r in rows):
                continue
            started = time.perf_counter()
            compressed = compress_lowrank(model, calibration, param_ratio=ratio, progress=False, **VARIANTS[variant])
            if variant.endswith("+kd1"):
                vitslim.distill(compressed, model, train, vitslim.Training(epochs=1, lr=args.finetune_lr, progress=False))
            seconds = time.perf_counter() - started
            result = vitslim.evaluate(compressed, test, limit=args.eval_limit, teacher=model)
            rows.append({"variant": variant, "ratio": ratio, "params": count_params(compressed), "top1": result["top1"],
                         "agreement": result["agreement"], "seconds": seconds})
            print(f"{variant:14s} ratio {ratio:.2f}: top-1 {100 * result['top1']:.2f}%  ({seconds:.0f} s to compress)", flush=True)
            write(out, rows, args)


def write(out: Path, rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_file(out / "results.json", lambda partial: partial.write_text(json.dumps(rows, indent=2)))
    model_label = args.model.replace(str(SHARED), "../shared")
    lines = [f"Model `{model_label}`; calibration: {args.calib_images} train images (seed 0); top-1 on {rows[0]['images']} test images; "
             f"KD: 1 epoch over the train split, lr {args.finetune_lr}.", "",
             "| variant | param ratio | params | top-1 | agreement | compress s |", "|---|---|---|---|---|---|"]
    rows = [rows[0], *sorted(rows[1:], key=lambda r: (-r["ratio"], list(VARIANTS).index(r["variant"])))]
    lines += [f"| {r['variant']} | {r['ratio']:.2f} | {r['params']:,} | {100 * r['top1']:.2f}% | "
              f"{100 * r['agreement']:.2f}% | {r['seconds']:.0f} |" if "agreement" in r else
              f"| {r['variant']} | 1.00 | {r['params']:,} | {100 * r['top1']:.2f}% | - | - |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
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
