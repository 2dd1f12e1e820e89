"""Fingerprints of every method's training-free output on vit-d6-cifar10, to prove a refactor
changed no figure: each method's compressed model runs on fixed images and the SHA-256 of its
logits (float32 bytes) is printed as JSON. Run it before and after a change and diff the two.

    .venv/bin/python scripts/method_fingerprints.py > before.json   # on the old commit
    .venv/bin/python scripts/method_fingerprints.py > after.json    # on the new one
    diff before.json after.json                                     # empty: bit-identical

Timing-driven choices (cait's measured schedule tightening, lowrank+cait's timed probes) depend on
the machine's load, so they are switched off here: everything else is deterministic on one CPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import vitslim
from vitslim.adapters import describe
from vitslim.io.image_batches import select
from vitslim.io.image_dataset import build_transform
from vitslim.io.image_sources import open_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "vit-d6-cifar10"
TRAIN = SHARED / "data" / "cifar10-jpeg" / "train.zip"
CASES = {  # name: (method, options); calibration on 64 seeded train images everywhere
    "lowrank-0.5": ("lowrank", {"param_ratio": 0.5}),
    "lowrank-0.3-uniform-r8": ("lowrank", {"param_ratio": 0.3, "allocation": "uniform", "rank_multiple": 8}),
    "svd-0.5": ("svd", {"param_ratio": 0.5}),
    "asvd-0.5": ("asvd", {"param_ratio": 0.5}),
    "cait-atme-1.5": ("cait", {"speedup": 1.5, "measure": False}),
    "cait-tome-1.5": ("cait", {"speedup": 1.5, "merge": "tome", "measure": False}),
    "cait-window-1.3-full": ("cait", {"speedup": 1.3, "merge": "window", "measure": False, "dense": True}),
    "composed-flops-0.5-params-0.6": ("lowrank+cait", {"flops_ratio": 0.5, "param_ratio": 0.6}),
}


def fingerprint(model: torch.nn.Module, images: torch.Tensor) -> str:
    with torch.no_grad():
        return hashlib.sha256(model.eval()(images).float().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)  # one thread: the same reduction order on every run
    original = vitslim.load_model(MODEL)
    train = open_images(TRAIN, build_transform(describe(original).preprocessing), labels_required=False)
    images = torch.stack([train[index][0] for index in range(1000, 1032)])
    small = select(train, limit=128, seed=0)
    results = {"original": fingerprint(original, images)}
    for name, (method, options) in CASES.items():
        compressed = vitslim.compress(original, method, small, calib_images=64, progress=False, **options)
        results[name] = fingerprint(compressed, images)
        print(name, results[name], file=sys.stderr)
    for kind in ("weight", "dynamic"):
        compressed = vitslim.compress(original, "lowrank", small, calib_images=64, progress=False, param_ratio=0.5, int8=kind)
        results[f"lowrank-0.5-int8-{kind}"] = fingerprint(compressed, images)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
