"""Would q, k and v gain from ranks of their own? The allocator's own loss estimate, joint against split.

vitslim factorises timm's fused ``qkv`` Linear (3d × d) as one matrix: one rank, one input basis
shared by q, k and v, at a cost of 4d parameters per rank. Giving each of q, k and v its own
factorisation (three d × d matrices, 2d per rank each) lets the allocator spend ranks where they
pay (issue #27 asks for it "where it pays"), but gives up the shared basis. Which wins is a
question about the weights and activations, and it can be answered before anything is built: the
whitened spectrum of each matrix gives its output error at every rank in closed form, the Fisher
sensitivity weighs it into the model's loss, and the greedy allocation (``lowrank.allocation``) is
optimal for that separable objective. So this study compares, at the same parameter budget, the
loss estimate that the allocation minimises when the qkv layers are joint (vitslim's default)
and when they are split, under two loss models: the per-layer mean Fisher weight (what
``lowrank`` uses) and per-output-channel Fisher weights (which tell q, k and v apart).

Calibration as in ``lowrank_correction.py``: 256 seeded images of the task's training images
(dense: ImageNet sample images 0-499 for the saliency model; classification: CIFAR-10 train for
the classifier), Fisher on the first 16 of them (the method's default). Nothing is compressed
and nothing is reported on held-out images: the estimate is what would decide a split.

    .venv/bin/python benchmarks/studies/lowrank_qkv_split.py          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and the dinov2 helpers

import common
import torch
from dinov2_dense import dense_data
from dinov2_saliency import DENSE_SPLIT, IMAGENET, MODEL, load_saliency

import vitslim
from vitslim.lowrank.allocation import LayerCost, allocate, normalised_error
from vitslim.lowrank.calibration import collect_grams
from vitslim.lowrank.compensation import output_root
from vitslim.lowrank.compress import compressible_linears
from vitslim.lowrank.sensitivity import FISHER_IMAGES, fisher_channels
from vitslim.lowrank.whitening import whitened_energy
from vitslim.measure.metrics import count_params

RATIOS = (0.6, 0.5, 0.4)
RANK_MULTIPLE = 8


def layer_costs(linears, grams, fisher, *, split: bool, per_channel: bool) -> list[LayerCost]:
    """The allocator's input, in loss units (mean Fisher × whitened σ², or per-channel Fisher × σ²
    of the channel-weighted matrix), with each qkv Linear one matrix or three."""
    costs = []
    for name, layer in linears.items():
        weight, gram, channels = layer.weight.detach().double(), grams[name].gram, fisher[name]
        parts = [(name, slice(None))]
        if split and name.endswith("qkv"):
            width = weight.shape[0] // 3
            parts = [(f"{name}[{part}]", slice(index * width, (index + 1) * width)) for index, part in enumerate("qkv")]
        for part_name, rows in parts:
            part, part_channels = weight[rows], channels[rows]
            root = output_root(part_channels) if per_channel else None
            energy = whitened_energy(part if root is None else root[:, None] * part, gram)
            costs.append(LayerCost(part_name, part.shape[0], part.shape[1], energy, float(part_channels.mean()) * float(energy.sum())))
    return costs


def study(task: str, model, train, total: int) -> list[dict]:
    batches = common.image_batches(train, 256, 16, seed=0)
    linears = compressible_linears(model)
    fisher = fisher_channels(model, linears, batches, images=FISHER_IMAGES, progress=False)
    grams = collect_grams(model, linears, batches, progress=False)
    fixed = total - sum(layer.weight.numel() for layer in linears.values())
    rows = []
    for ratio in RATIOS:
        for per_channel in (False, True):
            estimates = {}
            for split in (False, True):
                costs = layer_costs(linears, grams, fisher, split=split, per_channel=per_channel)
                plans = allocate(costs, int(ratio * total) - fixed, rank_multiple=RANK_MULTIPLE, min_rank=RANK_MULTIPLE)
                estimates[split] = normalised_error(costs, plans)
                qkv = [plan for plan in plans if "qkv" in plan.name]
                estimates[f"ranks_{split}"] = " ".join(str(plan.rank or "dense") for plan in qkv[-6 if split else -2:])
            rows.append({"task": task, "ratio": ratio, "loss_model": "per-channel Fisher" if per_channel else "mean Fisher",
                         "joint": estimates[False], "split": estimates[True], "split_over_joint": estimates[True] / estimates[False],
                         "joint_last_qkv_ranks": estimates["ranks_False"], "split_last_qkv_ranks": estimates["ranks_True"]})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.parse_args()
    torch.manual_seed(0)
    saliency = load_saliency(MODEL).eval()
    train, _ = dense_data(vitslim.describe(saliency), Namespace(imagenet=IMAGENET, dense_train=DENSE_SPLIT, dense_report=0, seed=0))
    rows = study("dense", saliency, train, count_params(saliency.backbone))
    classifier = vitslim.load_model(MODEL).eval()
    rows += study("classification", classifier, common.open_split(vitslim.describe(classifier), common.CIFAR_TRAIN, labelled=False),
                  count_params(classifier))
    out = common.RESULTS / "dinov2" / "lowrank-qkv-split"
    common.write_json(out.with_suffix(".json"), {"machine": common.machine(), "rows": rows})
    columns = [common.Column("task", "task"), common.Column("ratio", "param ratio"), common.Column("loss_model", "loss model"),
               common.Column("joint", "loss estimate, joint qkv", lambda v: f"{v:.4g}"),
               common.Column("split", "split q/k/v", lambda v: f"{v:.4g}"),
               common.Column("split_over_joint", "split / joint", lambda v: f"{v:.3f}"),
               common.Column("joint_last_qkv_ranks", "ranks, last 2 qkv (joint)"),
               common.Column("split_last_qkv_ranks", "ranks, last 2 qkv as q k v (split)")]
    lines = common.heading("Joint or split q/k/v ranks: the allocator's loss estimate on dinov2-s14",
                           "Command: `.venv/bin/python benchmarks/studies/lowrank_qkv_split.py`. Same budget (param ratio of the "
                           f"backbone), ranks multiples of {RANK_MULTIPLE}; 256 seeded calibration images per task, Fisher on "
                           f"{FISHER_IMAGES}. The estimate is Σ over layers of the Fisher-weighted output error the allocation "
                           "leaves (what `lowrank.allocation.allocate` minimises); below 1 in `split / joint` would mean "
                           "separate q, k, v ranks pay.")
    lines += common.markdown_table(columns, rows)
    common.write_lines(out.with_suffix(".md"), lines, echo=True)


if __name__ == "__main__":
    main()
