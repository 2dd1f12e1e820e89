"""``benchmarks/dinov2.py --parts dense``: the saliency model compressed, judged by fidelity to the original's maps."""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch
from common import ROOT, Column, Rows
from dinov2_pages import (
    MAP_SCORES,
    SCHEDULE_COLUMNS,
    cait_text,
    check_settings,
    fmt_params,
    fmt_speedup,
    in_order,
    needs_timing,
    page_text,
    recipe_notes,
    say,
    stored,
    target_of,
    time_group,
    timed_compress,
    timing_text,
    write_page,
)
from dinov2_saliency import DENSE_SPLIT, THRESHOLD, SaliencyModel, load_saliency, saliency_skeleton
from torch import nn
from torch.utils.data import Subset

import vitslim
from vitslim.io import image_batches, image_dataset, image_sources
from vitslim.measure.metrics import count_params

# --- dense ----------------------------------------------------------------------------------------

def dense_variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    """(key, label, method, options): the training-free variants of the dense part."""
    merges = (("atme", "ATME"), ("tome", "ToMe"), ("window", "2x2 window (ALGM-style)"))
    variants = [(f"{merge}-{speedup}", label, "cait", {"speedup": speedup, "merge": merge})
                for merge, label in merges for speedup in (1.5, 2.0)]
    variants += [(f"lowrank-{ratio}", "low-rank", "lowrank", {"param_ratio": ratio, "rank_multiple": 8})
                 for ratio in (0.6, 0.5)]
    return [v for v in variants if v[0] in ("atme-2.0", "lowrank-0.5")] if quick else variants


def dense_data(spec, args) -> tuple[Subset, Subset]:
    """The ImageNet sample in sorted file order: [0, dense_train) to train on, [500, 1000) to report on."""
    images = image_sources.open_images(args.imagenet, image_dataset.build_transform(spec.preprocessing), labels_required=False)
    if len(images) < 2 * DENSE_SPLIT:
        raise SystemExit(f"{args.imagenet} holds {len(images)} images; the dense part needs {2 * DENSE_SPLIT}")
    if not 1 <= args.dense_train <= DENSE_SPLIT:
        raise SystemExit(f"--dense-train must be 1-{DENSE_SPLIT}")
    return Subset(images, range(args.dense_train)), Subset(images, range(DENSE_SPLIT, len(images)))


def original_maps(model: nn.Module, report: Subset, args) -> dict:
    """How much of the original's maps is salient (above the threshold) on the reported images,
    which is what IoU is computed over (an image where neither map is salient scores IoU 1)."""
    loader = image_batches.make_loader(image_batches.select(report, limit=args.dense_report, seed=args.seed), 16)
    images = salient_images = 0
    fraction = 0.0
    with torch.no_grad():
        for batch, _, _ in loader:
            salient = model(batch) > THRESHOLD
            images += batch.shape[0]
            salient_images += int(salient.flatten(1).any(1).sum())
            fraction += float(salient.float().flatten(1).mean(1).sum())
    return {"images": images, "salient_images": salient_images, "salient_fraction": fraction / images}


def load_saved_saliency(row: dict, args) -> SaliencyModel:
    return vitslim.load_model(str(ROOT / row["folder"]), skeleton=saliency_skeleton(args.model))


def dense_part(parser, args) -> None:
    models_dir = Path(args.out) / "models" / "dense"
    path = Path(args.out) / "models" / "rows-dense.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "dense_train": args.dense_train, "dense_report": args.dense_report,
                "calib_images": args.calib_images, "measure": args.measure, "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "dense", path)
    teacher = load_saliency(args.model)
    spec = vitslim.describe(teacher)
    say(f"[dense] {args.model}: backbone at '{spec.path}', {count_params(teacher.backbone):,} backbone parameters, "
        f"{count_params(teacher.decoder):,} in the decoder")
    train, report = dense_data(spec, args)
    if not rows.has(key="original"):
        started = time.perf_counter()
        coverage = original_maps(teacher, report, args)
        rows.add({"key": "original", "variant": "original", "method": None, "target": None, "pearson": 1.0, "iou": 1.0,
                  "mae": 0.0, "cosine": 1.0, "params": count_params(teacher.backbone), **coverage, "seconds": 0.0,
                  "settings": settings})
        say(f"[dense] original: {coverage['salient_images']}/{coverage['images']} report images have pixels above "
            f"{THRESHOLD}, {100 * coverage['salient_fraction']:.1f}% of the pixels "
            f"({time.perf_counter() - started:.0f} s)")
    for key, label, method, options in dense_variants(args.quick):
        if rows.has(key=key):
            continue
        say(f"[dense] {key}: compressing ({method} {options})")
        compressed, seconds = timed_compress(teacher, method, train, args, **options)
        score = vitslim.evaluate(compressed, report, teacher=teacher, limit=args.dense_report, seed=args.seed,
                                 batch_size=16, threshold=THRESHOLD, progress=args.progress)
        folder = vitslim.save(compressed, models_dir / key)
        row = rows.add({"key": key, "variant": label, "method": method, "target": target_of(options),
                        **{name: score.get(name) for name in MAP_SCORES}, "params": count_params(compressed.backbone),
                        "flops": score["flops"], "seconds": seconds, "folder": stored(folder),
                        **recipe_notes(compressed), "settings": settings})
        say(f"[dense] {key}: pearson {row['pearson']:.4f}, IoU@{THRESHOLD} {row['iou']:.4f}, MAE {row['mae']:.4f} on "
            f"{row['images']} images; compressed in {seconds:.0f} s")
    group = list(rows)
    if needs_timing(group, args):
        models = [("original", teacher)]
        models += [(row["key"], load_saved_saliency(row, args)) for row in group if "folder" in row]
        time_group(rows, group, models, args, "dense")
        # the backbones alone (merging hooks and all), the speed-up token merging is planned for
        time_group(rows, group, [(name, model.backbone) for name, model in models], args, "dense backbones", field="backbone_speedup")
    original = rows.find(key="original")
    columns = [Column("variant", "variant"), Column("target", "target", lambda v: f"{v:g}", "-"),
               Column("pearson", "pearson", "{:.4f}"), Column("iou", f"IoU@{THRESHOLD}", "{:.4f}"),
               Column("mae", "MAE", "{:.4f}"), Column("cosine", "cosine", "{:.4f}"),
               Column("params", "backbone params", fmt_params), Column("backbone_speedup", "backbone speed-up", fmt_speedup),
               Column("speedup", "whole-model speed-up", fmt_speedup), Column("seconds", "compress s", "{:.0f}"), *SCHEDULE_COLUMNS]
    table = in_order(group, ["original"] + [key for key, *_ in dense_variants(False)])
    text = page_text(parser, args, "dense", (
        f"Model: `{common.shown(args.model)}` with its saliency decoder (`decoder.safetensors`, loaded strictly), as "
        f"one `SaliencyModel` (backbone + decoder, output a (B, 1, 224, 224) map); vitslim compresses the backbone and "
        f"preserves the map (objective `auto`: per-pixel MSE). Images: `{common.shown(args.imagenet)}` in sorted file "
        f"order (ImageNet classes by wnid): images 0-{args.dense_train - 1} calibrate ({args.calib_images} of them, "
        f"seeded, seed {args.seed}) and choose the merge schedule's shape (concentration C, ATME's first level); "
        f"{original['images']} images of 500-999 (seeded, all when 500) are reported. The two halves hold different "
        f"classes (0-499 are mostly animals), so the report also tests transfer to unseen content.\n\n"
        f"Fidelity to the original's maps on the reported images (`vitslim.evaluate` with the original as teacher): "
        f"mean per-image pearson and cosine, per-pixel MAE, mean per-image IoU of the regions above {THRESHOLD} (an "
        f"image where neither map exceeds {THRESHOLD} counts 1; the original's maps exceed it on "
        f"{original['salient_images']} of the {original['images']} images, {100 * original['salient_fraction']:.1f}% "
        f"of the pixels). Token merging restores the full token grid before the decoder (`token_map` auto: dense). "
        f"Training-free: no distillation. cait {cait_text(args)}; low-rank keeps `param_ratio` of the backbone's "
        f"parameters (its unused 3,850-parameter CIFAR-10 head included), ranks multiples of 8.\n\n"
        + timing_text(group, args)))
    write_page(args, "dense", "DINOv2 ViT-S/14 saliency model: training-free compression", text, columns, table,
               notes=["![fidelity against measured backbone speed-up](dense.png)"], settings=settings)
    plot_dense(table, Path(args.out) / "dense.png")


def plot_dense(rows: list[dict], path: Path) -> None:
    """Pearson r and IoU@0.8 against the measured backbone speed-up, one line per method: the
    methods compared at equal measured speed rather than at equal FLOPs targets."""
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(row["variant"] for row in rows if row["key"] != "original"):
        points = sorted((row["backbone_speedup"], row["pearson"], row["iou"]) for row in rows
                        if row["variant"] == variant and row.get("backbone_speedup"))
        for axis, index in zip(axes, (1, 2)):
            axis.plot([1.0] + [p[0] for p in points], [1.0] + [p[index] for p in points], marker="o", label=variant)
    for axis, name in zip(axes, ("Pearson r", f"IoU@{THRESHOLD}")):
        axis.set_xlabel("measured backbone speed-up (x)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("dinov2-s14 saliency maps, training-free, ImageNet sample images 500-999")
    figure.tight_layout()
    common.atomic_file(path, lambda partial: figure.savefig(partial, dpi=110, format="png"))
    plt.close(figure)
