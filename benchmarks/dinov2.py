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

import tempfile
import time
from argparse import SUPPRESS
from pathlib import Path

import common
import torch
from dinov2_classification import classification_part
from dinov2_cost import cost_one, cost_part
from dinov2_dense import dense_part
from dinov2_kd import TARGET_KD_EPOCHS, TARGET_KD_IMAGES, kd_part
from dinov2_pages import say
from dinov2_saliency import DENSE_SPLIT, IMAGENET, MODEL

PARTS = ("dense", "classification", "kd", "cost")

# --- main -----------------------------------------------------------------------------------------

QUICK = {"dense_train": 16, "dense_report": 8, "calib_images": 16, "test_images": 16, "kd_images": 16, "bench_batch": 1,
         "tp_target": 1.2}  # at batch 1 the dense ATME+CDCP model measures about 1x, no speed-up to aim at
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
