"""Why a low-rank model's ONNX export can differ from PyTorch by more than 1e-3, and when it does.

Whitening scales each input direction of a layer by the inverse of its spread on the calibration
images, so a direction those images hardly used gets a large weight in the ``down`` factor. With
such factors a model's float32 arithmetic is ill-conditioned: two correct float32 runs (PyTorch,
ONNX Runtime) differ by much more than rounding usually allows. ``vitslim bench`` then compares
each with the model's float64 output (``runtimes.checked_onnx``). This study shows the two cases:

1. ``deit_base_patch16_224`` geometry, random init, low-rank 40% calibrated on 128 random images
   (as ``benchmarks/runtimes.py`` builds it): random attention averages values over all tokens,
   so the attention output spans few directions;
2. the low-rank 50% dinov2-s14 classifier that ``benchmarks/dinov2.py`` saved (real images).

For each: the largest entry of any ``down`` factor against the original's largest Linear weight,
and on 4 seeded random images the largest logit distance of PyTorch float32 and of ONNX Runtime
from the float64 output, and from each other.

    .venv/bin/python benchmarks/studies/float32_conditioning.py    # about 3 minutes
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import torch
from torch import nn

import vitslim
from vitslim.deploy import export
from vitslim.lowrank.layers import LowRankLinear

OUT = common.RESULTS / "studies" / "float32_conditioning"
DINOV2_LOWRANK = common.RESULTS / "dinov2" / "models" / "classification" / "lowrank-0.5"


def models() -> list[tuple[str, nn.Module, nn.Module]]:
    torch.manual_seed(0)
    original = vitslim.load_model("deit_base_patch16_224")
    size = vitslim.describe(original).preprocessing.input_size
    noise = torch.utils.data.TensorDataset(torch.randn(128, *size, generator=torch.Generator().manual_seed(0)), torch.zeros(128, dtype=torch.long))
    found = [("deit_base geometry, random init, low-rank 40% on 128 random images", original,
              vitslim.compress(original, "lowrank", noise, calib_images=128, param_ratio=0.4, rank_multiple=8, progress=False))]
    if DINOV2_LOWRANK.is_dir():
        found.append(("dinov2-s14 low-rank 50% (benchmarks/dinov2.py, 256 CIFAR-10 train images)",
                      vitslim.load_model(f"local-dir:{common.SHARED / 'models' / 'dinov2-s14'}"), vitslim.load_model(str(DINOV2_LOWRANK))))
    return found


def largest(weights) -> float:
    return max(float(weight.abs().max()) for weight in weights)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for name, original, lowrank in models():
        lowrank.eval()
        images = torch.randn(4, *vitslim.describe(lowrank).preprocessing.input_size, generator=torch.Generator().manual_seed(1))
        with tempfile.TemporaryDirectory() as scratch:
            exported, reference = export.onnx_and_reference(lowrank, vitslim.export_onnx(lowrank, Path(scratch) / "model.onnx"), images)
        exact = export.float64_output(lowrank, images)
        rows.append({"model": name,
                     "largest_down": largest(m.down.weight for m in lowrank.modules() if isinstance(m, LowRankLinear)),
                     "largest_original": largest(m.weight for m in original.modules() if isinstance(m, nn.Linear)),
                     "largest_logit": float(exact.abs().max()),
                     "pytorch_from_float64": float((reference - exact).abs().max()),
                     "onnx_from_float64": float((exported - exact).abs().max()),
                     "onnx_from_pytorch": float((exported - reference).abs().max())})
        print(rows[-1], flush=True)
    columns = [common.Column("model", "model"), common.Column("largest_down", "largest `down` entry", "{:.3g}"),
               common.Column("largest_original", "original's largest Linear weight", "{:.3g}"),
               common.Column("largest_logit", "largest logit", "{:.3g}"),
               common.Column("pytorch_from_float64", "PyTorch float32 − float64", "{:.2g}"),
               common.Column("onnx_from_float64", "ONNX Runtime − float64", "{:.2g}"),
               common.Column("onnx_from_pytorch", "ONNX Runtime − PyTorch", "{:.2g}")]
    text = (f"Command: {common.rerun(parser, args, leave_out=('out',))}. Largest absolute logit differences on 4 seeded random "
            f"images; ONNX files written by `vitslim.export_onnx`, run by ONNX Runtime on the CPU. Ran in "
            f"{time.perf_counter() - started:.0f} s.")
    lines = common.heading("float32 conditioning of low-rank factors", text) + common.markdown_table(columns, rows)
    common.write_table(Path(args.out) / "float32_conditioning.md", lines, {"rows": (columns, rows)}, echo=True)


if __name__ == "__main__":
    main()
