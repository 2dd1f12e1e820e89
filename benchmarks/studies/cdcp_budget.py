"""Does CDCP reach its channel budget within a short KD, and what does the pruning buy?

On dinov2-s14's CIFAR-10 classifier the earlier gates (a hinge penalty with an adaptive
multiplier) pruned 3 MLP channels in 125 KD steps: the budget's push lost to the distillation's
pull on almost every gate (docs/dinov2.md). Since 0.4 the budget is a constraint the masks meet
before every step (``ChannelGates.follow_budget``: a ceiling that comes down a cubic from 1 to the
target over the first 40% of the steps). This study records, for each variant, the FLOPs ratio
the masks keep at every step (by wrapping ``follow_budget``; nothing else changes), then the
kept channels, top-1 and agreement with the original on seeded CIFAR-10 *test* images, and the
speed-up measured against the original (eager PyTorch, interleaved, ``steady_timing``):

- **CDCP alone**: channels only, no merging, at ``--channel-ratio`` of the blocks' FLOPs;
- **ATME + CDCP 1.9x**: the paper's DeiT-S claim, √1.9 to tokens, the rest to channels;
- **Torch-Pruning**: ``benchmarks/peers.py`` bisected to CDCP alone's measured speed-up, then
  the same KD, so that the pruning is judged as pruning;
- **dense ATME + CDCP 2.0x** (``dense``): the saliency model, KD on ImageNet sample images 0-499
  (32 steps of 16), fidelity to the original's maps on 500-999 (Pearson r, IoU@0.8, MAE).

Every KD is ``--kd-images`` seeded train images for ``--kd-epochs`` (batch 16, lr ``--lr``), the
settings of ``benchmarks/dinov2.py --parts kd``.

    .venv/bin/python benchmarks/studies/cdcp_budget.py

Rows go to ``--out`` (cdcp-budget.md, with .json and .csv) as they finish; a rerun skips finished
rows (their state is kept in ``cdcp-budget-rows.json``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and peers

import common
import torch
from common import Column
from dinov2_saliency import MODEL

import vitslim
from vitslim.cait.gates import BUDGET_REACH, ChannelGates
from vitslim.cait.speed import steady_timing
from vitslim.io import image_batches
from vitslim.io.recipe import find_step

COLUMNS = (Column("variant", "variant"), Column("channel_ratio", "channel FLOPs target", "{:.3f}", "-"),
           Column("reached_at", "steps to 95% of the reduction", missing="-"), Column("final_ratio", "FLOPs ratio kept", "{:.3f}", "-"),
           Column("channels", "head dim / MLP hidden kept (first, last block)", missing="-"),
           Column("top1", "top-1", lambda v: f"{100 * v:.2f}%"), Column("delta", "Δ top-1", lambda v: f"{100 * v:+.2f}", "-"),
           Column("agreement", "agreement", lambda v: f"{100 * v:.2f}%", "-"), Column("speedup", "measured speed-up", "{:.2f}x", "-"),
           Column("seconds", "compress + KD s", "{:.0f}", "-"))
DENSE_COLUMNS = (Column("variant", "variant"), Column("channel_ratio", "channel FLOPs target", "{:.3f}", "-"),
                 Column("reached_at", "steps to 95% of the reduction", missing="-"), Column("final_ratio", "FLOPs ratio kept", "{:.3f}", "-"),
                 Column("channels", "head dim / MLP hidden kept (first, last block)", missing="-"),
                 Column("pearson", "Pearson r", "{:.4f}"), Column("iou", "IoU@0.8", "{:.3f}"), Column("mae", "MAE", "{:.4f}"),
                 Column("speedup", "measured speed-up (whole model)", "{:.2f}x", "-"), Column("seconds", "compress + KD s", "{:.0f}", "-"))


def recording_budget(trajectory: list[float]):
    """``ChannelGates.follow_budget`` that also appends the FLOPs ratio its masks keep."""
    follow = ChannelGates.follow_budget

    def recorded(self, *args, **kwargs):
        ceiling = follow(self, *args, **kwargs)
        trajectory.append(float(self._ratio(self._token_counts(kwargs.get("tokens")), level=self.threshold)))
        return ceiling

    return recorded


def reached_at(trajectory: list[float], target: float) -> int | None:
    """The first step (1-based) at which the masks keep 95% of the asked reduction, or None."""
    for step, ratio in enumerate(trajectory, 1):
        if 1 - ratio >= 0.95 * (1 - target):
            return step
    return None


def channels_kept(model) -> str:
    step = find_step(model, "channels")
    if step is None:
        return "-"
    blocks = list(step["blocks"].values())
    return " / ".join(f"{b.get('head_dim', '-')}, {b.get('mlp_hidden', '-')}" for b in (blocks[0], blocks[-1]))


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser)
    parser.set_defaults(model=MODEL)
    parser.add_argument("--kd-images", type=int, default=2000)
    parser.add_argument("--kd-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--channel-ratio", type=float, default=0.6, help="CDCP alone: the blocks' FLOPs its channels keep")
    parser.add_argument("--variants", default="cdcp,atme-cdcp,tp,dense", help="comma-separated, of cdcp, atme-cdcp, tp, dense")
    parser.add_argument("--out", default=str(common.RESULTS / "dinov2" / "cdcp-budget.md"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = common.Rows(out.with_name(out.stem + "-rows.json"))
    wanted = [name.strip() for name in args.variants.split(",") if name.strip()]

    original = vitslim.load_model(args.model)
    spec = vitslim.describe(original)
    train, test = common.open_split(spec, args.train), common.open_split(spec, args.test)
    kd_train = image_batches.select(train, limit=args.kd_images, seed=0)
    training = vitslim.Training(epochs=args.kd_epochs, lr=args.lr, batch_size=16)
    steps = math.ceil(len(kd_train) / 16) * args.kd_epochs

    def score(model) -> dict:
        return vitslim.evaluate(model, test, teacher=original, limit=args.test_images, seed=0, progress=False)

    if not rows.has(key="original"):
        result = vitslim.evaluate(original, test, limit=args.test_images, seed=0, progress=False)
        rows.add({"key": "original", "variant": "original", "top1": result["top1"], "images": result["images"]})
    baseline = rows.find(key="original")["top1"]

    def finish(key: str, label: str, model, seconds: float, **fields) -> None:
        result = score(model)
        timing = steady_timing(original, model, label=key)
        row = rows.add({"key": key, "variant": label, "top1": result["top1"], "delta": result["top1"] - baseline,
                        "agreement": result["agreement"], "speedup": timing.ratio, "noisy": timing.noisy, "seconds": seconds,
                        "steps": steps, **fields})
        print(f"{key}: top-1 {100 * row['top1']:.2f}% ({100 * row['delta']:+.2f}), agreement {100 * row['agreement']:.2f}%, "
              f"{row['speedup']:.2f}x{' (noisy)' if timing.noisy else ''}", flush=True)

    cdcp_variants = {"cdcp": ("CDCP alone", {"speedup": 1 / args.channel_ratio, "channel_ratio": args.channel_ratio, "measure": False}),
                     "atme-cdcp": ("ATME + CDCP 1.9x", {"speedup": 1.9, "merge": "atme"})}
    for key, (label, options) in cdcp_variants.items():
        if key not in wanted or rows.has(key=key):
            continue
        cait = vitslim.Cait(gate_training=training, **options)
        target = cait.split()[1]
        started = time.perf_counter()
        model, trajectory = compress_recording(original, cait, kd_train)
        finish(key, label, model, time.perf_counter() - started, channel_ratio=target, reached_at=reached_at(trajectory, target),
               final_ratio=trajectory[-1] if trajectory else None, channels=channels_kept(model), trajectory=trajectory[::5])

    if "tp" in wanted and not rows.has(key="tp") and rows.has(key="cdcp"):
        import peers

        target = rows.find(key="cdcp")["speedup"]
        images = torch.stack([kd_train[index][0] for index in range(32)])
        started = time.perf_counter()
        model, measured, keep = peers.prune_to_speedup(original, target, images, importance="taylor",
                                                       measure=lambda first, candidate: steady_timing(first, candidate).ratio)
        vitslim.distill(model, original, kd_train, training)
        finish("tp", f"Torch-Pruning (Taylor, keep {keep:.3f}) + the same KD", model, time.perf_counter() - started,
               aimed_at=round(target, 3))

    if "dense" in wanted and not rows.has(key="dense"):
        dense_row(rows, args, training)

    table = [rows.find(key=key) for key in ("original", "cdcp", "atme-cdcp", "tp") if rows.has(key=key)]
    dense = [rows.find(key=key) for key in ("dense",) if rows.has(key=key)]
    text = (f"dinov2-s14 with its CIFAR-10 head. KD: {len(kd_train)} seeded train images x {args.kd_epochs} epoch(s), "
            f"{steps} steps of 16, lr {args.lr:g} (gates at the scale `prune_channels` gives a run this short). The budget "
            f"ceiling reaches its target at {BUDGET_REACH:.0%} of the steps. Top-1 and agreement on {args.test_images} seeded "
            f"CIFAR-10 test images; speed-up measured in eager PyTorch against the original in one interleaved run (batch 32, "
            f"retimed while noisy). Command: {common.command(*sys.argv[1:])}")
    lines = [*common.heading("CDCP's budget schedule on a short KD: dinov2-s14 classifier", text), *common.markdown_table(COLUMNS, table)]
    if dense:
        lines += ["", "Saliency model (dense): KD on ImageNet sample images 0-499 (one epoch, 32 steps of 16, same lr), fidelity to the "
                      "original's maps on images 500-999; speed-up of the whole model, eager, interleaved.", "",
                  *common.markdown_table(DENSE_COLUMNS, dense)]
    common.write_table(out, lines, {"rows": (COLUMNS, table), "dense": (DENSE_COLUMNS, dense)}, echo=True)


def compress_recording(model, cait, images) -> tuple:
    """``vitslim.compress(model, cait, images)`` (256 calibration images, seed 0) with the channel
    FLOPs ratio of every KD step recorded: (compressed model, trajectory)."""
    trajectory: list[float] = []
    original_follow = ChannelGates.follow_budget
    ChannelGates.follow_budget = recording_budget(trajectory)
    try:
        return vitslim.compress(model, cait, images, calib_images=256, seed=0, progress=True), trajectory
    finally:
        ChannelGates.follow_budget = original_follow


def dense_row(rows, args, training) -> None:
    """ATME + CDCP 2.0x on the saliency model, KD on images 0-499, reported on 500-999."""
    from dinov2_saliency import DENSE_SPLIT, IMAGENET, THRESHOLD, load_saliency
    from torch.utils.data import Subset

    from vitslim.io import image_dataset, image_sources

    teacher = load_saliency()
    spec = vitslim.describe(teacher)
    images = image_sources.open_images(str(IMAGENET), image_dataset.build_transform(spec.preprocessing), labels_required=False)
    train, report = Subset(images, range(DENSE_SPLIT)), Subset(images, range(DENSE_SPLIT, len(images)))
    cait = vitslim.Cait(speedup=2.0, merge="atme", gate_training=training)
    target = cait.split()[1]
    started = time.perf_counter()
    model, trajectory = compress_recording(teacher, cait, train)
    seconds = time.perf_counter() - started
    result = vitslim.evaluate(model, report, teacher=teacher, seed=0, batch_size=16, threshold=THRESHOLD, progress=False)
    timing = steady_timing(teacher, model, label="dense")
    row = rows.add({"key": "dense", "variant": "ATME + CDCP 2.0x (saliency)", "channel_ratio": target,
                    "reached_at": reached_at(trajectory, target), "final_ratio": trajectory[-1] if trajectory else None,
                    "channels": channels_kept(model), "pearson": result["pearson"], "iou": result["iou"], "mae": result["mae"],
                    "speedup": timing.ratio, "noisy": timing.noisy, "seconds": seconds, "steps": len(trajectory),
                    "trajectory": trajectory})
    print(f"dense: pearson {row['pearson']:.4f}, IoU {row['iou']:.3f}, {row['speedup']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
