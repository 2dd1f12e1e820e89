"""Export a (compressed) model to ONNX and check the file against PyTorch with ONNX Runtime.

The exported graph takes a batch of preprocessed images (any batch size) and returns the class
logits, whatever the model's family returns from its own forward. ``onnx``, ``onnxscript`` (the
exporter's own dependencies) and ``onnxruntime`` come with the ``export`` extra.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torch import nn

from vitslim.adapters import describe
from vitslim.atomic import atomic_file
from vitslim.adapters.base import logits_of
from vitslim.errors import VitslimError


class LogitsOnly(nn.Module):
    """``model`` with its output reduced to the logits tensor, so every family exports alike."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise VitslimError(f"ONNX export needs the '{module}' package; install it with: pip install 'vitslim[export]'") from None


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch_size: int = 2, verbose: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` (written under a temporary name, then renamed), with
    a dynamic batch dimension. ``batch_size`` only shapes the example input used for tracing."""
    _require("onnx")
    _require("onnxscript")
    path = Path(path)
    if path.is_dir():
        raise VitslimError(f"{path} is a folder; give the ONNX file's path (e.g. {path / 'model.onnx'})")
    spec = describe(model)
    model.eval()
    example = torch.randn(batch_size, *spec.preprocessing.input_size, device=next(model.parameters()).device)

    def write(partial: Path) -> None:
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet, torch.no_grad():
            torch.onnx.export(LogitsOnly(model), (example,), str(partial), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False)

    return atomic_file(path, write)


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between ONNX Runtime's logits for ``path`` and the model's own."""
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})
    with torch.no_grad():
        reference = describe(model).logits(images).float().cpu()
    return float((torch.from_numpy(exported) - reference).abs().max())
