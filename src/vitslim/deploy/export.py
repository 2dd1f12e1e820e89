"""Export a (compressed) model for deployment and check the file against PyTorch.

Two formats: ONNX, checked with ONNX Runtime (``onnx``, ``onnxscript`` and ``onnxruntime`` come
with the ``export`` extra), and ``torch.export``'s ExportedProgram (``.pt2``: a whole-graph
capture that AOTInductor and ExecuTorch compile ahead of time), checked by loading it back. The
exported graph takes a batch of preprocessed images (any batch size) and returns the model's one
output tensor (class logits, or a dense map or features for a user's model around a ViT), whatever
the model's family returns from its own forward.

``int8="dynamic"`` writes an ONNX file whose matmuls run in int8 under ONNX Runtime: the float
graph is exported first, then ONNX Runtime's own dynamic quantiser (``quantize_onnx_dynamic``)
stores every Linear's weight (the low-rank factors too) as int8 with one scale per output channel
and quantises its input at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``). Such a file
no longer matches PyTorch to 1e-4; ``compare_onnx`` says how close it is (relative error, largest
difference, top-1 agreement) and ``vitslim export --int8 dynamic`` checks the relative error.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitslim._infra.atomic import atomic_file
from vitslim.adapters import describe
from vitslim.adapters.base import primary_output
from vitslim.deploy.quantize import dequantised, int8_layers, weight_only_matmuls
from vitslim.errors import ParameterError, VitslimError

ONNX_INT8_KINDS = ("dynamic",)
ONNX_TOLERANCE = 1e-4  # largest absolute output difference from PyTorch a float ONNX file may show (``check_onnx``)
INT8_TOLERANCE = 0.2  # largest relative output error ||int8 - float|| / ||float|| of an int8 file (docs/export.md has the figures)
# the weight type ONNX Runtime's dynamic quantiser stores: signed int8 (activations are uint8), as
# MLAS runs u8 x s8 matmuls with AVX-512 VNNI / AMX natively; u8 x u8 has no such instruction, and
# on this project's CPU it ran deit_small at batch 8 1.04x as fast as float against 1.58x for s8
ONNX_WEIGHT_TYPE = "QInt8"
# CPU flags of an x86 int8 dot-product instruction; without one, MLAS multiplies u8 x s8 with
# AVX2's vpmaddubsw, whose int16 pair sums saturate
_INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags() -> frozenset[str] | None:
    """This x86 Linux CPU's feature flags; None elsewhere (ARM's int8 dot products do not saturate)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def onnx_weight_type(flags: frozenset[str] | None) -> str:
    """The int8 weight type for a CPU: ``ONNX_WEIGHT_TYPE`` (signed) where an int8 dot-product
    instruction runs u8 x s8 exactly, unsigned ``QUInt8`` on an x86 CPU with AVX2 and none (its
    u8 x s8 kernel saturates, its u8 x u8 kernel widens first and does not). Measured on an
    AVX2-only AMD EPYC (2 threads, ONNX Runtime 1.32), relative error to float on 8 random images:
    dinov2-s14 0.069 signed, 0.046 signed 7-bit, 0.033 unsigned; its low-rank 60% model 0.68,
    0.34 and 0.13; batch-8 latency within 2% of float for all three (no int8 speed-up there)."""
    if flags is not None and "avx2" in flags and not flags & _INT8_DOT_FLAGS:
        return "QUInt8"
    return ONNX_WEIGHT_TYPE


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


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch_size: int = 2, int8: str | None = None, verbose: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` (written under a temporary name, then renamed), with
    a dynamic batch dimension. ``batch_size`` only shapes the example input used for tracing.

    ``int8="dynamic"``: the float graph goes through ``quantize_onnx_dynamic`` before it lands at
    ``path`` (int8 matmuls under ONNX Runtime). For a model already holding int8 layers
    (``quantize_int8``) exactly those layers become int8 MatMuls, over the same int8 weights and
    scales (``quantize.dequantised``), and the Linears it keeps in float stay float. Without
    ``int8``, int8 layers export as float matmuls over their dequantised weights (the computation
    PyTorch checks the file against).
    """
    if int8 is not None and int8 not in ONNX_INT8_KINDS:
        raise ParameterError("int8", f"must be None or 'dynamic' (for the smallest file, quantise the model itself: "
                                     f"with quantize_int8(model)), not {int8!r}")
    _require("onnx")
    _require("onnxscript")
    path = Path(path)
    if path.is_dir():
        raise VitslimError(f"{path} is a folder; give the ONNX file's path (e.g. {path / 'model.onnx'})")
    if int8 == "dynamic":
        _require("onnxruntime")
        source, layers = _int8_source(model)
        with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.resolve().parent) as scratch:
            float_graph = export_onnx(source, Path(scratch) / "float.onnx", batch_size=batch_size, verbose=verbose)
            return quantize_onnx_dynamic(float_graph, path, modules=layers)
    spec = describe(model)
    model.eval()
    example = torch.randn(batch_size, *spec.preprocessing.input_size, device=next(model.parameters()).device)

    def write(partial: Path) -> None:
        quiet = contextlib.nullcontext() if verbose else _quiet_exporter()
        with quiet, torch.no_grad(), weight_only_matmuls(model):
            torch.onnx.export(OutputOnly(model).eval(), (example,), str(partial), input_names=["images"], output_names=[_output_name(spec, example)],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False)

    return atomic_file(path, write)


def _int8_source(model: nn.Module) -> tuple[nn.Module, list[str] | None]:
    """What an int8 ONNX file of ``model`` is quantised from, and which Linears of it: a model
    holding int8 layers as its float twin (``quantize.dequantised``) with exactly those layers; a
    float model as it is, every Linear (None)."""
    layers = list(int8_layers(model))
    return (dequantised(model), layers) if layers else (model, None)


def _output_name(spec, example: torch.Tensor) -> str:
    """"logits" for a classifier, as deployments of one expect; "output" for maps and features."""
    from vitslim.measure.objective import infer_kind

    with torch.no_grad():
        return "logits" if infer_kind(spec, spec.output(example)) == "logits" else "output"


class _HidePreprocessingAdvice(logging.Filter):
    """ONNX Runtime's quantiser logs, on the root logger, advice to run its shape-inference
    pre-processing first; that helps static quantisation and models of unknown shapes, and
    changes nothing for the MatMuls of an exported ViT (every Linear is quantised without it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_onnx_dynamic(source: str | os.PathLike, target: str | os.PathLike, *, modules: list[str] | None = None) -> Path:
    """Write ``source`` (a float ONNX file) to ``target`` with ONNX Runtime's dynamic int8
    quantisation: every MatMul with a constant weight (each Linear, low-rank factors included) gets
    int8 weights with one scale per output channel and uint8 activations quantised at run time;
    attention's two activation-by-activation matmuls stay float, and so does the patch embedding's
    convolution, as in PyTorch's int8 (ONNX Runtime's ConvInteger made deit_small slower here:
    1.49x float instead of 1.68x with MatMuls alone). On an x86 CPU without an int8 dot-product
    instruction the weights are unsigned (``onnx_weight_type``): the file is made for the CPU it
    is written and checked on. ``modules`` (qualified names in the exported model) limits the
    quantisation to those Linears' MatMuls; None quantises every one. Written under a temporary
    name, then renamed."""
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    if target.is_dir():
        raise VitslimError(f"{target} is a folder; give the ONNX file's path (e.g. {target / 'model-int8.onnx'})")
    nodes = None if modules is None else matmuls_of(source, modules)
    advice = _HidePreprocessingAdvice()

    def write(partial: Path) -> None:
        logging.getLogger().addFilter(advice)
        try:
            quantize_dynamic(str(source), str(partial), per_channel=True, weight_type=getattr(QuantType, onnx_weight_type(cpu_flags())),
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)
        finally:
            logging.getLogger().removeFilter(advice)

    return atomic_file(target, write)


# the torch.onnx exporter (dynamo) records on every node the module scopes it was traced in
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def matmuls_of(path: str | os.PathLike, modules: list[str]) -> list[str]:
    """The MatMul and Gemm nodes of the exported file ``path`` that compute the Linears ``modules``
    (qualified names in the model ``export_onnx`` was given): the nodes whose innermost module
    scope is one of them (ONNX Runtime's quantiser turns a Gemm into an int8 MatMul).
    If none of the names is found, the file was not written by this exporter, and quantising
    nothing would pass a float file off as int8."""
    import onnx

    wanted = {f"model.{name}" for name in modules}  # export_onnx wraps the model as OutputOnly.model
    nodes = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = next((entry.value for entry in node.metadata_props if entry.key == _NAME_SCOPES), "")
        innermost = next((scope for scope in reversed(ast.literal_eval(scopes or "[]")) if scope.startswith("model")), None)
        if innermost in wanted:
            nodes.append(node.name)
            if node.op_type == "Gemm":  # the quantiser first rewrites a Gemm as a MatMul of this name, which it then selects by name
                nodes.append(f"{node.name}_MatMul")
    if modules and not nodes:
        raise VitslimError(f"{path}: none of its MatMuls is traced to the int8 layers ({', '.join(modules[:3])}, ...); "
                           "export the model with vitslim.export_onnx")
    return nodes


@dataclass(frozen=True)
class OnnxComparison:
    """How ONNX Runtime's output for a file compares with PyTorch's on the same images.

    ``relative_error`` is ||onnx - torch|| / ||torch|| over the whole batch (Frobenius), the
    measure int8 files are checked by: unlike the largest difference, it does not grow with the
    scale of a model's logits. ``top1_agreement`` is the share of images whose arg-max class is
    the same, for class logits only (None for maps and features).
    """

    max_abs_diff: float
    relative_error: float
    top1_agreement: float | None


def compare_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> OnnxComparison:
    """Run ``path`` in ONNX Runtime and ``model`` in PyTorch on ``images`` and compare the outputs."""
    exported, reference = onnx_and_reference(model, path, images)
    difference = exported - reference
    top1 = None
    if _output_name(describe(model), images[:1].to(next(model.parameters()).device)) == "logits":
        top1 = float((exported.argmax(dim=-1) == reference.argmax(dim=-1)).float().mean())
    return OnnxComparison(max_abs_diff=float(difference.abs().max()),
                          relative_error=float(difference.norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny)),
                          top1_agreement=top1)


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between ONNX Runtime's output for ``path`` and the model's own."""
    exported, reference = onnx_and_reference(model, path, images)
    return float((exported - reference).abs().max())


def float64_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    """The model's output computed in float64 on a copy (then cast to float32), or None for a model
    with a layer that runs in float32 only: the yardstick for how far a float32 result may stray
    from the exact one through rounding alone. Dynamic-int8 layers compute over their dequantised
    weights in float64, as their export does."""
    exact = copy.deepcopy(model).cpu().double()
    try:
        with torch.no_grad():
            return describe(exact).output(images.detach().cpu().double()).float()
    except RuntimeError:
        return None


def onnx_and_reference(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX Runtime's output for ``path`` and PyTorch's for ``model``, both float32 on the CPU.
    PyTorch computes as the exported graph does: a dynamic-int8 layer exports (and here runs) as
    float matmuls over its dequantised weights, since its int8 kernel cannot be traced."""
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"images": images.detach().cpu().float().numpy()})
    with torch.no_grad(), weight_only_matmuls(model):
        reference = describe(model).output(images).float().cpu()
    return torch.from_numpy(exported), reference


@dataclass(frozen=True)
class OnnxCheck:
    """A float ONNX file checked against PyTorch by the one rule ``vitslim export`` and ``bench``
    share (``check_onnx``).

    A file passes when ONNX Runtime's output is within ``tolerance`` of PyTorch's (largest
    absolute difference). A model whose float32 arithmetic is itself ill-conditioned (factors with
    large entries, as whitening gives directions its calibration images hardly used) can differ by
    more than that between two correct float32 runs; its file still passes when ONNX Runtime is at
    most twice as far from the model's float64 output as PyTorch's own float32 output is
    (``torch_rounding``, ``onnx_rounding``: measured only beyond the tolerance): it then computes
    the same function, rounded differently.
    """

    max_abs_diff: float
    tolerance: float
    torch_rounding: float | None = None
    onnx_rounding: float | None = None
    near_ties: int = 0  # images left out of the comparison: their merge decisions are near-ties (``check_onnx``)
    near_tie_diff: float | None = None  # the largest difference on those images

    @property
    def by_rounding(self) -> bool:
        """Passed beyond the tolerance, as float32 rounding."""
        return (not self.max_abs_diff <= self.tolerance and self.onnx_rounding is not None
                and self.onnx_rounding <= max(self.tolerance, 2 * self.torch_rounding))

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance or self.by_rounding

    def __str__(self) -> str:
        rounding = ("" if self.onnx_rounding is None else
                    f"; PyTorch's float32 output is {self.torch_rounding:.3g} from float64, ONNX Runtime's {self.onnx_rounding:.3g}"
                    + (": accepted as float32 rounding" if self.by_rounding else ""))
        ties = ("" if not self.near_ties else
                f"; {self.near_ties} image(s) left out as near-tie merge decisions (PyTorch itself merges otherwise on them when its keys "
                f"are jittered by {NEAR_TIE_JITTER:g}; ONNX Runtime differs there by up to {self.near_tie_diff:.3g})")
        return f"max abs difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}{rounding}{ties})"


# check_onnx's test for a near-tie merge decision: the relative jitter of the keys, and the runs
NEAR_TIE_JITTER = 1e-4
NEAR_TIE_RUNS = 4


def _rounding_check(exported: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor | None, tolerance: float) -> OnnxCheck:
    difference = float((exported - reference).abs().max())
    if difference <= tolerance or not math.isfinite(difference) or exact is None:
        return OnnxCheck(difference, tolerance)
    return OnnxCheck(difference, tolerance, float((reference - exact).abs().max()), float((exported - exact).abs().max()))


def _per_image(difference: torch.Tensor) -> torch.Tensor:
    return difference.abs().reshape(difference.shape[0], -1).amax(1)


_DECISION_JITTERS: list[Callable[[nn.Module, float, int], contextlib.AbstractContextManager[bool]]] = []


def register_decision_jitter(jitter: Callable[[nn.Module, float, int], contextlib.AbstractContextManager[bool]]) -> None:
    """Declare ``jitter(model, scale, seed)``: a context manager under which ``model``'s discrete
    decisions of one kind are taken on inputs perturbed by ``scale``, yielding whether the model
    takes any (token merging registers ``cait.patch.jittered_merge_keys``). Methods register,
    so that this layer needs to know none of them."""
    _DECISION_JITTERS.append(jitter)


def near_tie_images(model: nn.Module, images: torch.Tensor, reference: torch.Tensor, tolerance: float) -> torch.Tensor | None:
    """``(B,)`` bool: the images on which ``model``'s own output leaves ``tolerance`` when its
    discrete decisions (token merging's keys) are jittered (``register_decision_jitter``); None
    for a model that takes none. On such an image a decision is a near-tie, which a runtime's own
    rounding may settle either way."""
    moved = torch.zeros(images.shape[0], dtype=torch.bool)
    for run in range(NEAR_TIE_RUNS):
        with contextlib.ExitStack() as stack, torch.no_grad(), weight_only_matmuls(model):
            if not any([stack.enter_context(jitter(model, NEAR_TIE_JITTER, run)) for jitter in _DECISION_JITTERS]):
                return None
            jittered = describe(model).output(images).float().cpu()
        moved |= _per_image(jittered - reference) > tolerance
    return moved


def check_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor, tolerance: float) -> OnnxCheck:
    """Check the float ONNX file ``path`` against ``model`` on ``images`` (see ``OnnxCheck``).

    A token-merging model's output jumps where a merge decision flips, and float32 rounding
    flips a near-tie: on dinov2-s14 a row/column merge had two scores 3.3e-6 apart, and ONNX
    Runtime merged the other token on one image of 16. An image that fails the rule may
    therefore be left out when PyTorch's own output on it moves as its keys are jittered
    (``near_tie_images``); every other image must pass, and at most half may be left out, so a
    broken export (which differs on every image) cannot hide behind ties. On random images, where
    nearly every merge is a near-tie at the jitter's scale (dinov2-s14: all 4 of ``bench``'s check
    images), that still lets the one image whose decision ONNX Runtime's rounding settled otherwise
    out, and no more."""
    exported, reference = onnx_and_reference(model, path, images)
    difference = float((exported - reference).abs().max())
    if difference <= tolerance or not math.isfinite(difference):
        return OnnxCheck(difference, tolerance)
    exact = float64_output(model, images)
    check = _rounding_check(exported, reference, exact, tolerance)
    if check.passed:
        return check
    tied = near_tie_images(model, images, reference, tolerance)
    if tied is None:
        return check

    def check_on(selection) -> OnnxCheck:
        return _rounding_check(exported[selection], reference[selection], None if exact is None else exact[selection], tolerance)

    failing = torch.tensor([not check_on(slice(i, i + 1)).passed for i in range(images.shape[0])])
    if (failing & ~tied).any() or 2 * int(failing.sum()) > images.shape[0]:
        return check
    kept_check = check_on(~failing)
    return OnnxCheck(kept_check.max_abs_diff, tolerance, kept_check.torch_rounding, kept_check.onnx_rounding,
                     near_ties=int(failing.sum()), near_tie_diff=float(_per_image(exported - reference)[failing].max()))


@dataclass(frozen=True)
class CheckedExport:
    """What ``export_checked_onnx`` wrote and measured: the float graph's check and, for an int8
    file, how ONNX Runtime's int8 output compares with PyTorch's float output."""

    path: Path
    float_check: OnnxCheck
    int8: OnnxComparison | None = None


def export_checked_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor, *, tolerance: float = ONNX_TOLERANCE,
                        int8: str | None = None, int8_tolerance: float = INT8_TOLERANCE) -> CheckedExport:
    """``export_onnx``, kept only when it passes: the float graph must pass ``check_onnx`` on
    ``images`` within ``tolerance``; with ``int8="dynamic"`` it is then quantised, and the int8
    file's relative error to PyTorch's float output must be at most ``int8_tolerance`` (a guard
    against a broken file, not an accuracy promise). ``path`` is written only when every check
    passes; otherwise a ``VitslimError`` says which failed and by how much."""
    if int8 is not None and int8 not in ONNX_INT8_KINDS:
        raise ParameterError("int8", f"must be None or 'dynamic', not {int8!r}")
    path = Path(path)
    if path.is_dir():
        raise VitslimError(f"{path} is a folder; give the ONNX file's path (e.g. {path / 'model.onnx'})")
    checks: dict[str, object] = {}

    def export_and_check(unchecked: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=unchecked.parent) as scratch:
            source, layers = _int8_source(model) if int8 else (model, None)
            float_graph = export_onnx(source, Path(scratch) / "float.onnx" if int8 else unchecked)
            checks["float"] = check = check_onnx(model, float_graph, images, tolerance)
            if not check.passed:
                before = " before quantisation" if int8 else ""
                raise ParameterError("tolerance", f"is {tolerance:g}, but the ONNX graph's output{before} differs from PyTorch's: {check}; "
                                                  f"{path} was not written")
            if int8:
                quantize_onnx_dynamic(float_graph, unchecked, modules=layers)
        if int8:
            checks["int8"] = comparison = compare_onnx(model, unchecked, images)
            if not comparison.relative_error <= int8_tolerance:
                raise ParameterError("int8_tolerance", f"is {int8_tolerance:g}, but the int8 file's output differs from PyTorch's float "
                                                       f"output by a relative error of {comparison.relative_error:.3g}; {path} was not written")

    atomic_file(path, export_and_check)
    return CheckedExport(path, checks["float"], checks.get("int8"))


def _example(model: nn.Module, batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, *describe(model).preprocessing.input_size, device=next(model.parameters()).device)


def export_program(model: nn.Module, path: str | os.PathLike, *, batch_size: int = 2) -> Path:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``) to ``path``,
    with a dynamic batch dimension; written under a temporary name, then renamed."""
    path = Path(path)
    if path.is_dir():
        raise VitslimError(f"{path} is a folder; give the program file's path (e.g. {path / 'model.pt2'})")
    model.eval()
    with torch.no_grad(), weight_only_matmuls(model):
        program = torch.export.export(OutputOnly(model).eval(), (_example(model, batch_size),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return atomic_file(path, lambda partial: torch.export.save(program, str(partial)))


def program_max_abs_diff(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """Largest absolute difference between the saved program's output (loaded back from the file
    vitslim wrote) and the model's own."""
    program = torch.export.load(str(path)).module()
    with torch.no_grad(), weight_only_matmuls(model):  # as the program was traced: see _onnx_and_reference
        exported = program(images)
        reference = describe(model).output(images)
    return float((exported.float() - reference.float()).abs().max())
