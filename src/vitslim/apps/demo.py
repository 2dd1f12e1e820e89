"""``vitslim demo``: the whole tool on an embedded default that needs neither network nor data.

The images are the 1,797 real 8x8 handwritten digits that ship inside scikit-learn, written out
once as a PNG ImageFolder so the demo goes through the same data path a user's images do. A tiny
timm ViT is trained on the train split (cached, about half a minute on 2 cores), every method
vitslim has is applied to it, and each result is evaluated on the held-out split and benchmarked
against the original in one process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from torch import nn
from tqdm import tqdm

from vitslim._infra.atomic import atomic_folder
from vitslim._infra.table import human, percent, render
from vitslim.adapters import describe
from vitslim.errors import ParameterError, VitslimError
from vitslim.io import image_batches, image_dataset, image_sources
from vitslim.io.loading import load_model
from vitslim.io.persist import save
from vitslim.measure.bench import benchmark, noise_warning, ratio_text
from vitslim.measure.evaluate import evaluate
from vitslim.methods import methods
from vitslim.pipeline import compress

DIGITS_IMAGE_SIZE = 16  # 8x8 digits upsampled, 4x4 patches of 4 pixels
DEMO_MODEL_ARGS = {"img_size": DIGITS_IMAGE_SIZE, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0}
TRAIN_EPOCHS = 30
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("VITSLIM_CACHE", Path.home() / ".cache" / "vitslim"))


def digits_folder() -> Path:
    """scikit-learn's digits as ``train/<digit>/*.png`` and ``test/<digit>/*.png`` (80/20, seeded)."""
    target = cache_dir() / "digits-png"
    if (target / "test").is_dir():
        return target

    def write(folder: Path) -> None:
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(SEED)).tolist()
        cut = int(0.8 * len(order))
        for split, indices in (("train", order[:cut]), ("test", order[cut:])):
            for index in indices:
                label = int(digits.target[index])
                pixels = (digits.images[index] * (255 / 16)).round().astype("uint8")
                (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(folder / split / str(label) / f"{index:04d}.png")

    return atomic_folder(target, write)


def _new_demo_model() -> nn.Module:
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **DEMO_MODEL_ARGS)
    model.pretrained_cfg = {
        **model.pretrained_cfg, "input_size": (3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "interpolation": "bilinear", "label_names": [str(d) for d in range(10)],
    }
    return model


def train_demo_model(digits: Path, *, retrain: bool = False) -> Path:
    """Train (once, then cached) the demo ViT on the digits' train split; returns its folder."""
    target = cache_dir() / "demo-vit-digits"
    if (target / "model.safetensors").is_file() and not retrain:
        return target
    model = _new_demo_model()
    spec = describe(model)
    dataset = image_sources.open_images(digits / "train", image_dataset.build_transform(spec.preprocessing))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=TRAIN_EPOCHS * len(loader))
    model.train()
    for _ in tqdm(range(TRAIN_EPOCHS), desc="training the demo ViT (cached afterwards)", unit="epoch", disable=None):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    save(model.eval(), target)
    return target


@dataclass
class Variant:
    name: str
    model: nn.Module
    note: str


def build_variants(original: nn.Module, work: Path) -> list[Variant]:
    """The original, its save + reload round trip, then every registered method's examples
    (``Method.examples``), through the same pipeline a user's run takes."""
    variants = [Variant("original", original, "trained on the digits' train split")]
    save(original, work / "original")
    reloaded = load_model(work / "original")
    variants.append(Variant("saved + reloaded", reloaded, "safetensors + recipe round trip"))
    calibration = _calibration_batches(original)
    for method in methods():
        for example in method.examples:
            config = method(**example.options)
            compressed = compress(original, config, calibration, progress=False)
            save(compressed, work / example.folder)
            chosen = config.chosen(compressed)
            variants.append(Variant(example.label, compressed, f"{example.note}: {chosen}" if chosen else example.note))
    return variants


def _calibration_batches(model: nn.Module) -> list[torch.Tensor]:
    """256 train-split digits (never the test split the table reports on)."""
    spec = describe(model)
    dataset = image_sources.open_images(digits_folder() / "train", image_dataset.build_transform(spec.preprocessing))
    return [images for images, _, _ in image_batches.make_loader(image_batches.select(dataset, limit=256, seed=SEED), 64)]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for index, row in enumerate(rows):
        left.scatter(row["params"] / 1e3, 100 * row["top1"], s=60)
        # stagger labels so variants that land on the same point stay readable
        left.annotate(row["name"], (row["params"] / 1e3, 100 * row["top1"]), textcoords="offset points", xytext=(6, 6 - 12 * index))
    left.set(xlabel="parameters (thousands)", ylabel="top-1 on held-out digits (%)", title="accuracy vs size")
    left.grid(alpha=0.3)
    right.barh([r["name"] for r in rows], [r["ratio"] for r in rows], color="tab:green")
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set(xlabel="throughput ratio to the original (same run)", title="speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: Path, *, retrain: bool = False) -> list[dict]:
    started = time.perf_counter()
    try:
        out.parent.resolve().mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitslimError(f"cannot create the output folder {out}: {error.strerror}") from None
    if out.exists() and not out.is_dir():
        raise ParameterError("out", f"is {out}, which exists and is a file; choose another")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise ParameterError("out", f"is {out}, a folder with other content; the demo replaces its output folder whole, so choose a new or empty one")
    click.echo(f"1/4 data: scikit-learn's handwritten digits as PNG files in {cache_dir() / 'digits-png'}")
    digits = digits_folder()
    click.echo("2/4 model: a tiny timm ViT (16x16 input, 4x4 patches) trained on the train split")
    model_folder = train_demo_model(digits, retrain=retrain)
    original = load_model(model_folder)
    rows: list[dict] = []

    def fill(folder: Path) -> None:
        click.echo("3/4 methods: applying every method vitslim has")
        variants = build_variants(original, folder / "models")
        click.echo("4/4 measuring: accuracy on the held-out test split, then speed in one interleaved run")
        for variant in variants:
            score = evaluate(variant.model, digits / "test", teacher=original, batch_size=128)
            rows.append({"name": variant.name, "note": variant.note, **score})
        speeds = benchmark([(v.name, v.model) for v in variants], batch_size=64, runs=20)
        for row, speed in zip(rows, speeds):
            row.update(ratio=speed.ratio, images_per_s=speed.images_per_s, ratio_text=ratio_text(speed))
        warning = noise_warning(speeds)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        _plot(rows, folder / "tradeoff.png")
        (folder / "report.md").write_text(_report(rows, speeds[0]))

    atomic_folder(out, fill)
    table = render(["variant", "top-1", "agreement", "params", "FLOPs/img", "throughput"],
                   [[r["name"], percent(r["top1"]), percent(r["agreement"]), human(r["params"]), human(r["flops"]), r["ratio_text"]] for r in rows])
    click.echo("\n" + table + "\n")
    click.echo(f"report: {out / 'report.md'}, plot: {out / 'tradeoff.png'} ({time.perf_counter() - started:.0f} s)")
    return rows


def _report(rows: list[dict], first) -> str:
    table = render(["variant", "top-1", "top-1 agreement", "params", "FLOPs / image", "throughput ratio", "what"],
                   [[r["name"], percent(r["top1"]), percent(r["agreement"]), f"{r['params']:,}", human(r["flops"]), r["ratio_text"], r["note"]] for r in rows],
                   markdown=True)
    return (
        "# vitslim demo\n\n"
        f"Model: a tiny timm ViT trained on scikit-learn's 8x8 handwritten digits ({rows[0]['images']} held-out test images).\n"
        f"Speed: {first.device}, {first.threads} threads, batch {first.batch_size}, {first.dtype}, median of {first.runs} interleaved runs; "
        "ratios are to the original measured in the same run.\n\n"
        f"{table}\n\n![accuracy vs size and speed](tradeoff.png)\n"
    )
