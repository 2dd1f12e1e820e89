"""``benchmarks/dinov2.py --parts classification``: the CIFAR-10 classifier compressed training-free."""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch
from common import ROOT, Column, Rows
from dinov2_pages import (
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
from torch import nn

import vitslim

# --- classification -------------------------------------------------------------------------------

class RememberedOutputs(nn.Module):
    """``model`` with its outputs remembered per batch: every variant of a part is evaluated on the
    same seeded images in the same order, so the original, as the teacher, runs once per batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.memory: dict[tuple, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        key = (tuple(images.shape), float(images.double().sum()), float(images[..., ::7, ::5].double().square().sum()))
        if key not in self.memory:
            self.memory[key] = self.model(images)
        return self.memory[key]


def chosen(variants: list[tuple[str, str, str, dict]], args) -> list[tuple[str, str, str, dict]]:
    """The variants named by ``--variants`` (all when not given)."""
    if not args.variants:
        return variants
    wanted = set(args.variants.split(","))
    unknown = wanted - {key for key, *_ in variants}
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(key for key, *_ in variants)}")
    return [variant for variant in variants if variant[0] in wanted]


def classification_variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    variants = [(f"lowrank-{ratio}", "low-rank", "lowrank", {"param_ratio": ratio, "rank_multiple": 8})
                for ratio in (0.6, 0.5, 0.4, 0.3)]
    variants += [(f"{merge}-{speedup}", label, "cait", {"speedup": speedup, "merge": merge})
                 for merge, label in (("atme", "ATME"), ("tome", "ToMe")) for speedup in (1.3, 1.5, 2.0)]
    variants += [("composed-2.0", "low-rank + ATME (1/2 of the FLOPs, <= 60% of the params)", "lowrank+cait",
                  COMPOSED)]
    return [v for v in variants if v[0] in ("lowrank-0.5", "atme-1.5")] if quick else variants


COMPOSED = {"flops_ratio": 0.5, "param_ratio": 0.6}  # the composed variant's bounds; its split is chosen by probes


def classification_part(parser, args) -> None:
    models_dir = Path(args.out) / "models" / "classification"
    path = Path(args.out) / "models" / "rows-classification.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "calib_images": args.calib_images, "test_images": args.test_images,
                "measure": args.measure, "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "classification", path)
    original = vitslim.load_model(args.model)
    spec = vitslim.describe(original)
    train, test = common.open_split(spec, args.train), common.open_split(spec, args.test)
    if not rows.has(key="original"):
        started = time.perf_counter()
        score = vitslim.evaluate(original, test, limit=args.test_images, seed=args.seed, progress=args.progress)
        rows.add({"key": "original", "variant": "original", "method": None, "target": None, "top1": score["top1"],
                  "agreement": 1.0, "kl": 0.0, "images": score["images"], "params": score["params"],
                  "flops": score["flops"], "seconds": 0.0, "settings": settings})
        say(f"[classification] original: top-1 {100 * score['top1']:.2f}% on {score['images']} test images "
            f"({time.perf_counter() - started:.0f} s)")
    teacher = RememberedOutputs(original)
    for key, label, method, options in chosen(classification_variants(args.quick), args):
        if rows.has(key=key):
            continue
        say(f"[classification] {key}: compressing ({method} {options})")
        compressed, seconds = timed_compress(original, method, train, args, **options)
        score = vitslim.evaluate(compressed, test, teacher=teacher, limit=args.test_images, seed=args.seed,
                                 progress=args.progress)
        folder = vitslim.save(compressed, models_dir / key)
        row = rows.add({"key": key, "variant": label, "method": method, "target": target_of(options),
                        "top1": score["top1"], "agreement": score["agreement"], "kl": score["kl"],
                        "images": score["images"], "params": score["params"], "flops": score["flops"],
                        "seconds": seconds, "folder": stored(folder), **recipe_notes(compressed), "settings": settings})
        say(f"[classification] {key}: top-1 {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%, "
            f"KL {row['kl']:.4f}; compressed in {seconds:.0f} s")
    group = list(rows)
    if needs_timing(group, args):
        models = [("original", original)] + [(row["key"], vitslim.load_model(str(ROOT / row["folder"])))
                                             for row in group if "folder" in row]
        time_group(rows, group, models, args, "classification")
    first = rows.find(key="original")
    columns = [Column("variant", "variant"), Column("target", "target", lambda v: f"{v:g}", "-"),
               Column("top1", "top-1", "{:.2%}"), Column("agreement", "agreement", "{:.2%}"),
               Column("kl", "KL", "{:.4f}"),
               Column("params", "params", fmt_params), Column("speedup", "measured speed-up", fmt_speedup),
               Column("seconds", "compress s", "{:.0f}"), *SCHEDULE_COLUMNS]
    table = in_order(group, ["original"] + [key for key, *_ in classification_variants(False)])
    text = page_text(parser, args, "classification", (
        f"Model: `{common.shown(args.model)}`, the plain timm ViT with its linear CIFAR-10 head (logits; objective "
        f"`auto`: KL). Calibration: {args.calib_images} seeded CIFAR-10 train images (seed {args.seed}, "
        f"`{common.shown(args.train)}`); reported on {first['images']} seeded CIFAR-10 test images "
        f"(`{common.shown(args.test)}`, seed {args.seed}), upsampled 32 -> 224 by the model's eval transform. "
        f"Agreement and KL are against the original's predictions on the same images. Training-free. cait "
        f"{cait_text(args)}, `token_map` auto (merged: the class-token head reads no patch tokens); low-rank keeps "
        f"`param_ratio` of the "
        f"ViT's parameters, ranks multiples of 8. The head is weak (README: 70.4% on 1,000 test images); what it "
        f"measures is how far a compressed model drifts from the original.\n\n" + timing_text(group, args)))
    write_page(args, "classification", "DINOv2 ViT-S/14 CIFAR-10 classifier: training-free compression", text, columns,
               table, settings=settings)
