"""Export a (compressed) model for deployment and check the file against PyTorch.

Two formats: ONNX, checked with ONNX Runtime (``onnx``, ``onnxscript`` and ``onnxruntime`` come
with the ``export`` extra), and ``torch.export``'s ExportedProgram (``.pt2``: a whole-graph
capture that AOTInductor and ExecuTorch compile ahead of time), checked by loading it back. The
exported graph takes a batch of preprocessed images (any batch size) and returns the model's one
output tensor (class logits, or a dense map or features for a user's model around a ViT), whatever
the model's family returns from its own forward.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from vitslim.adapters import describe
from vitslim.adapters.base import primary_output
from vitslim.atomic import atomic_file
from vitslim.errors import VitslimError


class OutputOnly(nn.Module):
    """``model`` with its output reduced to one tensor (``primary_output``), so every family exports alike."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return primary_output(self.model(images))


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise VitslimError(f"ONNX export needs the '{module}' package; install it with: pip install 'vitslim[export]'") from None


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter prints its progress, logs warnings about its own internals (for example
    onnx_ir's "Attribute type is ambiguous" on empty attribute lists) and trips torch's own
    deprecation warnings: nothing a user can act on, and the file is checked against PyTorch
    afterwards either way. ``verbose`` keeps all of it."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside the exporter
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
        quiet = contextlib.nullcontext() if verbose else _quiet_exporter()
        with quiet, torch.no_grad():
            torch.onnx.export(OutputOnly(model).eval(), (example,), str(partial), input_names=["images"], output_names=[_output_name(spec, example)],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False)

    return atomic_file(path, write)


def _output_name(spec, example: torch.Tensor) -> str:
    """"logits" for a classifier, as deployments of one expect; "output" for maps and features."""
    from vitslim.objective import infer_kind

    with torch.no_grad():
        return "logits" if infer_kind(spec, spec.output(example)) == "logits" else "output"


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between ONNX Runtime's output for ``path`` and the model's own."""
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"images": images.detach().cpu().float().numpy()})
    with torch.no_grad():
        reference = describe(model).output(images).float().cpu()
    return float((torch.from_numpy(exported) - reference).abs().max())


def _example(model: nn.Module, batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, *describe(model).preprocessing.input_size, device=next(model.parameters()).device)


def export_program(model: nn.Module, path: str | os.PathLike, *, batch_size: int = 2) -> Path:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``) to ``path``,
    with a dynamic batch dimension; written under a temporary name, then renamed."""
    path = Path(path)
    if path.is_dir():
        raise VitslimError(f"{path} is a folder; give the program file's path (e.g. {path / 'model.pt2'})")
    model.eval()
    with torch.no_grad():
        program = torch.export.export(OutputOnly(model).eval(), (_example(model, batch_size),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return atomic_file(path, lambda partial: torch.export.save(program, str(partial)))


def program_max_abs_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between the saved program's output (loaded back from the file
    vitslim wrote) and the model's own."""
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        exported = program(images)
        reference = describe(model).output(images)
    return float((exported.float() - reference.float()).abs().max())
