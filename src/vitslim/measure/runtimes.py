"""Getting a model into the runtimes ``vitslim bench`` times: eager PyTorch, ``torch.compile`` and ONNX Runtime.

``vitslim.measure.bench`` times whatever this module hands it (a module, a compiled module, an ONNX
Runtime session) alike, interleaved in one process.

ONNX Runtime gets the model as ``vitslim.deploy.export.export_onnx`` writes it. Exporting a big model
takes longer than timing it, so files are cached under a key hashed from what decides the graph
(the module tree, the recipe steps, every weight, the input size and the torch version), and each
file, cached or new, is checked against PyTorch before it is timed: a speed-up of a graph that
computes something else would be meaningless.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vitslim._infra.progress import logger as progress_log
from vitslim.adapters import describe
from vitslim.deploy import export
from vitslim.deploy.quantize import int8_layers
from vitslim.errors import ParameterError, VitslimError
from vitslim.io import recipe as recipes

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime")
COMPILE_MODE = "default"  # torch.compile's own default: no CUDA graphs, no long autotuning
ONNX_TOLERANCE = export.ONNX_TOLERANCE
ONNX_CHECK_IMAGES = 4


def compiled(model: nn.Module, **options) -> Callable[[torch.Tensor], object]:
    """``torch.compile`` (``options`` passed on; default mode) of ``model``'s call through an entry
    function of its own; the first (warm-up) call compiles.

    Dynamo keeps compiled graphs, with their guards, on the code object it intercepts. Compiled
    directly, every model of one class shares ``forward``'s cache: each call of the n-th model first
    checks the guards of those compiled before it, and the ninth passes dynamo's recompile limit (8)
    and runs uncompiled, silently. A code object per model gives each model a cache of its own."""
    def call(images: torch.Tensor) -> object:
        return model(images)

    call.__code__ = call.__code__.replace(co_name=f"call_model_{next(_COMPILED)}")
    return torch.compile(call, **{"mode": COMPILE_MODE, **options})


_COMPILED = itertools.count()


# --- ONNX Runtime -----------------------------------------------------------------------------

def require_onnxruntime(device: torch.device, dtype: torch.dtype):
    """The ``onnxruntime`` module, once the device and dtype are known to be ones it can time."""
    if dtype != torch.float32:
        raise ParameterError("dtype", "must be float32 for the onnxruntime runtime: vitslim's ONNX files are float32 "
                                      "(time float16/bfloat16 in the eager or compile runtime)")
    try:
        import onnxruntime
    except ImportError:
        raise VitslimError("the onnxruntime runtime needs the 'onnxruntime' package; install it with: pip install 'vitslim[export]'") from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ParameterError("device", "is cuda, which for the onnxruntime runtime needs ONNX Runtime's CUDAExecutionProvider; "
                                       f"this onnxruntime lacks it (it has {', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu instead")
    return onnxruntime


def default_onnx_cache() -> Path:
    """``$VITSLIM_CACHE/onnx``, or ``~/.cache/vitslim/onnx``: beside the demo's cache."""
    return Path(os.environ.get("VITSLIM_CACHE", Path.home() / ".cache" / "vitslim")) / "onnx"


def _hook_key(hook) -> str:
    """What a forward hook computes, for the cache key: its owner's ``hook_key()`` when the hook is
    a bound method (or a partial of one) of an object that has one, else the function's name. A
    ViT inside a user's model carries its merge schedule in such hooks, while the recipe that
    records it sits on the user's model, outside the ViT alone."""
    function = getattr(hook, "func", hook)
    owner = getattr(function, "__self__", None)
    described = owner.hook_key() if callable(getattr(owner, "hook_key", None)) else ""
    return f"{getattr(function, '__qualname__', type(function).__qualname__)}:{described}:{getattr(hook, 'args', ())!r}"


def onnx_cache_key(model: nn.Module) -> str:
    """A hash of everything that decides the exported graph and its numbers: the module tree
    (factorised layers, pruned widths), the recipe steps of every module holding some (merge
    schedules live there, not in the weights), the forward hooks (a ViT taken out of a merging
    user's model merges by its hooks alone), every tensor of the state, the input size and the
    torch version (the exporter)."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
    for module_name, module in model.named_modules():
        if recipes.steps(module):
            digest.update(f"{module_name}:{json.dumps(recipes.steps(module), sort_keys=True, default=str)}\n".encode())
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            digest.update(f"{module_name}:{_hook_key(hook)}\n".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(f"{tuple(describe(model).preprocessing.input_size)}:{torch.__version__}".encode())
    return digest.hexdigest()


def _make_cache(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ParameterError("onnx_cache", f"is {cache}, which cannot be written ({error.strerror}); choose another") from None


def cached_onnx(model: nn.Module, cache: Path) -> tuple[Path, bool]:
    """The model's ONNX file in ``cache``, exported now if it is not there yet, and whether it was
    there. The export goes to a temporary name of this process's own and is renamed into place
    (``vitslim._infra.atomic.atomic_file``), so a concurrent run never reads a half-written file."""
    path = cache / f"{onnx_cache_key(model)[:32]}.onnx"
    if path.is_file():
        logger.info("reusing %s", path)
        return path, True
    _make_cache(cache)
    progress_log.info("exporting %s to ONNX for ONNX Runtime", type(model).__name__)
    export.export_onnx(model, path)
    logger.info("exported %s", path)
    return path, False


def checked_onnx(name: str, model: nn.Module, cache: Path, tolerance: float) -> Path:
    """The model's cached ONNX file, once it passes ``export.check_onnx`` (the rule ``vitslim
    export`` applies too) within ``tolerance`` on a few random images; a clear error otherwise.
    A model holding dynamic int8 layers is exported as ONNX Runtime would run it, int8 MatMuls,
    and checked by the int8 rule (``_checked_int8_onnx``)."""
    model.to("cpu", torch.float32).eval()
    images = torch.randn(ONNX_CHECK_IMAGES, *describe(model).preprocessing.input_size, generator=torch.Generator().manual_seed(1))
    if "dynamic" in int8_layers(model).values():
        return _checked_int8_onnx(name, model, cache, images)
    path, reused = cached_onnx(model, cache)
    try:
        check = export.check_onnx(model, path, images, tolerance)
    except Exception as error:  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...) for a damaged file
        if not reused:
            raise
        # a cache entry truncated or damaged on disk (a full disk, a copy cut short): export it afresh
        logger.warning("%s: the cached ONNX file %s cannot be run (%s); exporting it again", name, path,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        path.unlink(missing_ok=True)
        path, _ = cached_onnx(model, cache)
        check = export.check_onnx(model, path, images, tolerance)
    if check.by_rounding:
        logger.warning("%s: its ONNX export differs from PyTorch by more than the tolerance: %s", name, check)
    if not check.passed:
        raise VitslimError(f"{name}: its ONNX export ({path}) differs from PyTorch on {ONNX_CHECK_IMAGES} random images: {check}; "
                           "timing it would time a different computation")
    return path


def _checked_int8_onnx(name: str, model: nn.Module, cache: Path, images: torch.Tensor) -> Path:
    """A model holding dynamic int8 layers as ONNX Runtime runs it: its int8 layers as int8
    MatMuls (``export_onnx(..., int8="dynamic")``), the rest float, checked by the rule for int8
    files alone: ONNX Runtime's output within ``export.INT8_TOLERANCE`` of PyTorch's float
    output (relative error). A file that computes something else fails it by far; a merge
    decision that float32 rounding flips (``check_onnx``'s near-ties), which the float rule of
    1e-4 can trip on, moves the output far less than int8's own rounding does."""
    path = cache / f"{onnx_cache_key(model)[:32]}-int8.onnx"
    if path.is_file():
        try:
            comparison = export.compare_onnx(model, path, images)
        except Exception:  # a damaged cache entry: written again below
            comparison = None
        if comparison is not None and comparison.relative_error <= export.INT8_TOLERANCE:
            logger.info("reusing %s", path)
            return path
        path.unlink(missing_ok=True)
    _make_cache(cache)
    progress_log.info("exporting %s to ONNX for ONNX Runtime, its int8 layers as int8 MatMuls", type(model).__name__)
    export.export_onnx(model, path, int8="dynamic")
    comparison = export.compare_onnx(model, path, images)
    if not comparison.relative_error <= export.INT8_TOLERANCE:
        path.unlink(missing_ok=True)
        raise VitslimError(f"{name}: its int8 ONNX export differs from PyTorch's float output by a relative error of "
                           f"{comparison.relative_error:.3g} (tolerance {export.INT8_TOLERANCE:g}) on {ONNX_CHECK_IMAGES} random images; "
                           "timing it would time a different computation")
    return path


def onnx_session(path: Path, *, threads: int, device: torch.device):
    """An InferenceSession on ``path`` with torch's number of intra-op threads (and one inter-op
    thread, as torch runs a ViT's ops one after another), on the CPU or the CUDA device, its
    threads not spinning between runs."""
    onnxruntime = require_onnxruntime(device, torch.float32)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # each session owns a thread pool whose workers spin after a run; in an interleaved benchmark
    # they would still be spinning, on the same cores, through the next model's run
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about the graph's own initialisers etc. are not the user's to act on
    providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if device.type == "cuda" else ["CPUExecutionProvider"]
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise VitslimError(f"ONNX Runtime cannot load {path}: {error}") from None


def onnx_file_facts(path: Path) -> tuple[tuple[int, ...], int]:
    """The image size (channels, height, width) an ONNX file takes, and the values stored in its
    initialisers (its parameters; for an int8 file, the int8 weights plus their scales). Its one
    input must be a float batch of images with a fixed size after the batch dimension."""
    try:
        import onnx
    except ImportError:
        raise VitslimError("timing an .onnx file needs the 'onnx' package; install it with: pip install 'vitslim[export]'") from None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise VitslimError(f"{path} is not a readable ONNX file: {error}") from None
    initialisers = {initialiser.name for initialiser in graph.initializer}
    inputs = [tensor for tensor in graph.input if tensor.name not in initialisers]
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    if len(dims) != 4 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise VitslimError(f"{path} must take one float32 batch of images (batch, channels, height, width); "
                           f"its inputs are {', '.join(tensor.name for tensor in inputs) or 'none'}")
    if not all(dim.HasField("dim_value") for dim in dims[1:]):
        raise VitslimError(f"{path} has no fixed image size after the batch dimension; export it with fixed channels, height and width")
    params = sum(math.prod(initialiser.dims) for initialiser in graph.initializer)
    return tuple(dim.dim_value for dim in dims[1:]), params
