"""How calibration and distillation scale with processes under torchrun (issue #5).

For each configuration PxT (P processes of T threads) the script launches itself with
``torchrun --standalone --nproc-per-node P`` (gloo on CPU, NCCL where CUDA is visible) and, in every rank, compresses
the reference CIFAR-10 ViT to 50% of its parameters with the low-rank method (256 calibration
train images: statistics, Fisher weights, compensation) and then distils it for ``--steps``
steps of a global batch of 64 train images. Rank 0 reports the wall time of each phase and
saves the student; the parent compares every student with the first configuration's: the effective
weight of every Linear (``up @ down`` for a factorised one: the factors themselves are only
defined up to a rotation where singular values nearly tie, so float rounding may turn them
while their product stays put) and the logits on 256 seeded test images.

    .venv/bin/python benchmarks/distributed.py --configs 1x1 2x1 1x2

Equivalence is judged at equal threads per process (1x1 against 2x1): the thread count alone
changes the order of float summation, and the low-rank truncation, where singular values nearly
tie, turns that into visibly different factors (the 1x2 row shows how much). Speed is judged at
equal hardware (2x1 against 1x2 on a 2-core host). Writes ``OUT/distributed.json`` and
``OUT/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import vitslim
from vitslim._infra import distributed
from vitslim.adapters import describe
from vitslim.io import image_batches
from vitslim.lowrank.compress import compress_lowrank

BATCH = 64


def worker(args) -> None:
    distributed.init_from_environment()
    torch.set_num_threads(args.threads)
    model = vitslim.load_model(args.model)
    spec = describe(model)
    train = common.open_split(spec, args.train)
    calibration = common.image_batches(train, 256, 32, labels=True)
    distributed.barrier()
    start = time.perf_counter()
    compressed = compress_lowrank(model, calibration, vitslim.LowRank(param_ratio=0.5), progress=False)
    distributed.barrier()
    calibrate = time.perf_counter() - start
    subset = image_batches.select(train, limit=args.steps * BATCH, skip=256, seed=0)
    start = time.perf_counter()
    vitslim.distill(compressed, model, subset, vitslim.Training(epochs=1, batch_size=BATCH, seed=0, progress=False))
    distributed.barrier()
    train_seconds = time.perf_counter() - start
    if distributed.is_main():
        vitslim.save(compressed, args.weights)
        Path(args.report).write_text(json.dumps({"calibration_s": calibrate, "distill_s": train_seconds, "steps": args.steps}))
    distributed.shutdown(clean=True)


def effective_weights(model) -> dict:
    """The weight every Linear applies: its own, or ``up @ down`` for a factorised one."""
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "up") and hasattr(module, "down"):
            weights[name] = module.up.weight @ module.down.weight
        elif isinstance(module, torch.nn.Linear) and not name.endswith((".up", ".down")):
            weights[name] = module.weight
    return weights


def launch(config: str, args, folder: Path) -> dict:
    processes, threads = map(int, config.split("x"))
    weights, report = folder / f"student-{config}", folder / f"report-{config}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), __file__, "--worker",
               "--threads", str(threads), "--steps", str(args.steps), "--model", args.model, "--train", args.train,
               "--weights", str(weights), "--report", str(report)]
    subprocess.run(command, check=True)
    result = json.loads(report.read_text())
    result.update(processes=processes, threads_per_process=threads, weights=str(weights))
    return result


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["1x1", "2x1", "1x2"], help="PxT: P processes of T threads each")
    parser.add_argument("--steps", type=int, default=16, help="distillation steps of a global batch of 64")
    common.add_reference_arguments(parser)
    parser.add_argument("--out", default=str(common.RESULTS / "distributed"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    info = common.machine()
    with tempfile.TemporaryDirectory() as folder:
        rows = [launch(config, args, Path(folder)) for config in args.configs]
        students = [vitslim.load_model(row.pop("weights")) for row in rows]
    spec = vitslim.describe(students[0])
    test = common.open_split(spec, args.test)
    images = torch.cat([batch[0] for batch in image_batches.make_loader(image_batches.select(test, limit=256, seed=0), 64)])
    with torch.no_grad():
        reference_logits, reference_weights = students[0](images), effective_weights(students[0])
        for row, student in zip(rows, students):
            weights = effective_weights(student)
            row["max_abs_weight_diff_vs_first"] = max(float((weights[name] - reference_weights[name]).abs().max()) for name in weights)
            row["max_abs_logit_diff_vs_first"] = float((student(images) - reference_logits).abs().max())
            row["machine"] = info
    device = "CUDA (NCCL)" if torch.cuda.is_available() else f"CPU ({common.cpu_name()}, {os.cpu_count()} cores, gloo)"
    common.write_json(out / "distributed.json", rows)
    base = rows[0]
    lines = [
        *common.heading("Scaling with processes (torchrun)",
                        f"Command: {common.rerun(parser, args, always=('configs', 'steps'))}. Device: {device}. Model: vit-d6-cifar10, "
                        f"low-rank to 50% of the parameters from 256 train images, then {args.steps} distillation steps of a global batch "
                        f"of {BATCH} train images. Differences are against the first row.", info=info),
        "| processes | threads each | calibration + compensation (s) | distillation s/step | step time vs first | max abs effective-weight difference | max abs logit difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_step = row["distill_s"] / row["steps"]
        lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['calibration_s']:.1f} | {per_step:.3f} | "
                     f"{per_step / (base['distill_s'] / base['steps']):.2f}x | {row['max_abs_weight_diff_vs_first']:.2e} | {row['max_abs_logit_diff_vs_first']:.2e} |")
    common.write_lines(out / "distributed.md", lines, echo=True)


if __name__ == "__main__":
    main()
