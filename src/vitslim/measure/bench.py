"""Throughput, latency and memory, measured by the protocol in docs/protocol.md.

All models run in one process, in interleaved rounds (the order rotates each round), so slow
drift of a shared machine (thermal, other tenants) hits every model alike and the ratios stay
honest even when the absolute numbers move. With several runtimes (eager, ``torch.compile``,
ONNX Runtime: ``vitslim.measure.runtimes``) every model runs in each of them in every round, and ratios
compare models within one runtime.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vitslim._infra import distributed
from vitslim._infra.progress import logger as progress_log
from vitslim._infra.progress import track
from vitslim.adapters import describe
from vitslim.errors import ParameterError, VitslimError
from vitslim.measure import runtimes
from vitslim.measure.metrics import count_flops, count_params

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchResult:
    model: str
    images_per_s: float
    ratio: float  # throughput relative to the first model of the same run in the same runtime
    latency_ms: float  # median time of one batch
    latency_p90_ms: float
    peak_memory_mb: float | None  # peak RSS of the process (CPU) or max allocated (CUDA) while running it; None: not measurable
    params: int
    flops: int | None  # per image; None for an ONNX file, which has no PyTorch graph to count
    batch_size: int
    device: str
    dtype: str
    threads: int
    runs: int
    runtime: str = "eager"
    # (q3 - q1) / median of the per-round ratios (each round times every model back to back): how
    # far this ratio may move on a rerun. A quiet machine keeps it to a few percent; above
    # NOISY_SPREAD the machine was busy while timing (0 for the first model, the reference)
    ratio_spread: float = 0.0

    @property
    def noisy(self) -> bool:
        return self.ratio_spread > NOISY_SPREAD

    def as_dict(self) -> dict:
        return {**asdict(self), "noisy": self.noisy}


NOISY_SPREAD = 0.10


def ratio_text(result: BenchResult) -> str:
    """``1.52x``; for unstable timings with their spread: ``1.52x (noisy: spread 23%)``."""
    return f"{result.ratio:.2f}x" + (f" (noisy: spread {100 * result.ratio_spread:.0f}%)" if result.noisy else "")


def noise_warning(results: Sequence[BenchResult]) -> str | None:
    """A line on the results whose timings were unstable, or None when all were steady."""
    noisy = [result for result in results if result.noisy]
    if not noisy:
        return None
    names = ", ".join(dict.fromkeys(f"{result.model} ({result.runtime})" for result in noisy))
    return (f"unstable timings for {names}: ratio spread up to {100 * max(r.ratio_spread for r in noisy):.0f}% (steady is under "
            f"{100 * NOISY_SPREAD:.0f}%), so something else was using the CPU and these ratios may move on a rerun; time them "
            "again on a quiet machine")


def round_ratios(reference: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """The ratio of each round: the reference model's time over this model's, both timed in the
    same round (so a load that comes and goes hits both alike)."""
    return [first / mine for first, mine in zip(reference, seconds)]


def spread(values: Sequence[float]) -> float:
    """(q3 - q1) / median of ``values``: their relative interquartile range."""
    if len(values) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / median


@dataclass
class Runner:
    """One model ready in one runtime: ``run()`` runs a batch of fixed random images and returns
    once the device is done, so the timing loop treats every runtime alike; ``peak_memory_mb()``
    runs one more batch and reports its peak memory (None where it cannot be measured)."""

    run: Callable[[], None]
    peak_memory_mb: Callable[[], float | None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> None:
    """Linux lets a process reset its high-water mark of resident memory (clear_refs 5); elsewhere
    the peak stays process-wide."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_of(run: Callable[[], None]) -> float:
    _reset_peak_rss()
    run()
    return _peak_rss_mb()


def torch_runner(model: Callable[[torch.Tensor], object], images: torch.Tensor, device: torch.device) -> Runner:
    """Eager PyTorch, or a compiled module (called alike). Peak memory: peak RSS on CPU,
    ``torch.cuda.max_memory_allocated`` on CUDA."""

    def run() -> None:
        model(images)
        _sync(device)

    def peak_memory_mb() -> float:
        if device.type != "cuda":
            return _peak_rss_of(run)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        return torch.cuda.max_memory_allocated(device) / 2**20

    return Runner(run, peak_memory_mb)


def onnx_runner(session, images: torch.Tensor, device: torch.device) -> Runner:
    """ONNX Runtime on fixed images: fed as a NumPy array on the CPU; on CUDA bound in place on
    the device (IOBinding), so no host copy is timed, as none is for PyTorch. Peak memory: peak
    RSS on the CPU, as for PyTorch; on CUDA not measured (ONNX Runtime allocates through its own
    allocator, which torch's counters do not see)."""
    input_name = session.get_inputs()[0].name
    if device.type != "cuda":
        feed = {input_name: images.cpu().numpy()}

        def run() -> None:
            session.run(None, feed)

        return Runner(run, lambda: _peak_rss_of(run))
    import numpy

    on_device = images.to(device).contiguous()
    binding = session.io_binding()
    binding.bind_input(input_name, "cuda", device.index or 0, numpy.float32, tuple(on_device.shape), on_device.data_ptr())
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", device.index or 0)

    def run_on_device(bound_images: torch.Tensor = on_device) -> None:  # the default keeps the bound buffer alive
        session.run_with_iobinding(binding)
        _sync(device)

    return Runner(run_on_device, lambda: None)


MIN_RUNS = 20


def check_runs(runs: int) -> None:
    if runs < MIN_RUNS:
        raise ParameterError("runs", f"must be at least {MIN_RUNS}: fewer timed runs give medians too noisy to compare")


def _runtime_list(runtime: str | Sequence[str]) -> list[str]:
    names = [runtime] if isinstance(runtime, str) else list(runtime)
    if not names:
        raise VitslimError("give at least one runtime")
    unknown = [name for name in names if name not in runtimes.RUNTIMES]
    if unknown:
        raise ParameterError("runtime", f"is {unknown[0]!r}; choose from {', '.join(runtimes.RUNTIMES)}")
    return list(dict.fromkeys(names))  # each once, in the order given


def _is_onnx_file(model: object) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")


@dataclass
class _Model:
    """One entry of the model list, counted once for every runtime it is timed in."""

    name: str
    model: nn.Module | Path
    images: torch.Tensor  # float32 on the CPU; each runtime moves them where it runs
    params: int
    flops: int | None


def _counted(name: str, model: nn.Module | str | os.PathLike, batch_size: int, chosen: list[str]) -> _Model:
    generator = torch.Generator().manual_seed(0)
    if _is_onnx_file(model):
        path = Path(model)
        if chosen != ["onnxruntime"]:
            raise ParameterError("runtime", f"must be 'onnxruntime' alone to time {name}, an ONNX file")
        if not path.is_file():
            raise VitslimError(f"{path} does not exist")
        input_size, params = runtimes.onnx_file_facts(path)
        return _Model(name, path, torch.randn(batch_size, *input_size, generator=generator), params, None)
    if not isinstance(model, nn.Module):
        raise VitslimError(f"{name}: a model must be an nn.Module (or, for onnxruntime, an .onnx file's path), not {type(model).__name__}")
    input_size = describe(model).preprocessing.input_size
    return _Model(name, model, torch.randn(batch_size, *input_size, generator=generator), count_params(model), count_flops(model, input_size))


@dataclass
class _Timed:
    """One (runtime, model) pair of a run, ready to time."""

    runtime: str
    entry: _Model
    runner: Runner


def _runner(runtime: str, entry: _Model, *, target: torch.device, dtype: str, onnx_cache: Path, onnx_tolerance: float) -> Runner:
    if runtime == "onnxruntime":
        path = entry.model if isinstance(entry.model, Path) else runtimes.checked_onnx(entry.name, entry.model, onnx_cache, onnx_tolerance)
        return onnx_runner(runtimes.onnx_session(path, threads=torch.get_num_threads(), device=target), entry.images, target)
    model = entry.model.to(target, DTYPES[dtype]).eval()
    return torch_runner(runtimes.compiled(model) if runtime == "compile" else model, entry.images.to(target, DTYPES[dtype]), target)


def benchmark(
    models: list[tuple[str, nn.Module | str | os.PathLike]],
    *,
    batch_size: int = 32,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    warmup: int = 3,
    runs: int = 20,
    progress: bool = True,
    runtime: str | Sequence[str] = "eager",
    onnx_cache: str | os.PathLike | None = None,
    onnx_tolerance: float = runtimes.ONNX_TOLERANCE,
) -> list[BenchResult]:
    """Median images/s of each model on random inputs of its own input size, in each runtime, plus
    the ratio to the first model in the same runtime. At least 20 timed runs per model are taken,
    as the protocol requires; every (runtime, model) pair runs in each round, so drift of the host
    hits them alike. Results come runtime by runtime, models in the order given.

    ``runtime``: one of "eager", "compile" (``torch.compile``, default mode; the warm-up compiles)
    and "onnxruntime", or a list of them. For ONNX Runtime each model is exported to ``onnx_cache``
    (default ``~/.cache/vitslim/onnx``; reused when the same model comes again) and must match
    PyTorch within ``onnx_tolerance`` before it is timed; a model may also be an ``.onnx`` file's
    path, timed as it is (when onnxruntime is the only runtime)."""
    if not models:
        raise VitslimError("bench needs at least one model")
    if batch_size < 1:
        raise ParameterError("batch_size", f"must be at least 1 (got {batch_size})")
    check_runs(runs)
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"is {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not (math.isfinite(onnx_tolerance) and onnx_tolerance > 0):
        raise ParameterError("onnx_tolerance", f"must be a finite number above 0 (got {onnx_tolerance:g})")
    chosen = _runtime_list(runtime)
    if "compile" in chosen and warmup < 1:
        raise ParameterError("warmup", "must be at least 1 with the compile runtime: the first call compiles, and must not be timed")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", f"is {device!r}, but this torch sees no CUDA device")
    if threads is not None:
        if threads < 1:
            raise ParameterError("threads", f"must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    if "onnxruntime" in chosen:
        runtimes.require_onnxruntime(target, DTYPES[dtype])
    cache = Path(onnx_cache) if onnx_cache is not None else runtimes.default_onnx_cache()
    show = progress and distributed.is_main()
    if show:
        progress_log.info("benchmarking %d model(s) in %s: counting FLOPs%s", len(models), ", ".join(chosen),
                          ", exporting and checking ONNX files" if "onnxruntime" in chosen else "")
    entries = [_counted(name, model, batch_size, chosen) for name, model in models]
    # ONNX Runtime's runners first: exporting needs each model on the CPU in float32, before a
    # PyTorch runtime moves it to the device and dtype it is timed in
    runners = {(runtime, index): _runner(runtime, entry, target=target, dtype=dtype, onnx_cache=cache, onnx_tolerance=onnx_tolerance)
               for runtime in sorted(chosen, key=lambda name: name != "onnxruntime") for index, entry in enumerate(entries)}
    prepared = [_Timed(runtime, entry, runners[runtime, index])
                for runtime in chosen for index, entry in enumerate(entries)]
    timings: list[list[float]] = [[] for _ in prepared]
    order = list(range(len(prepared)))
    if show:
        progress_log.info("benchmarking: %d warm-up run(s) of each of %d runner(s), then %d timed rounds", warmup, len(prepared), runs)
    with torch.inference_mode():
        for timed in prepared:
            for _ in range(warmup):
                timed.runner.run()
        for round_index in track(range(runs), "benchmarking", unit="round", show=progress):
            shift = round_index % len(order)
            for index in order[shift:] + order[:shift]:
                start = time.perf_counter()
                prepared[index].runner.run()
                timings[index].append(time.perf_counter() - start)
        memory = [timed.runner.peak_memory_mb() for timed in prepared]
    results = []
    for timed, seconds, peak in zip(prepared, timings, memory):
        median = statistics.median(seconds)
        results.append(BenchResult(
            model=timed.entry.name, images_per_s=batch_size / median, ratio=1.0, latency_ms=median * 1e3,
            latency_p90_ms=statistics.quantiles(seconds, n=10)[-1] * 1e3, peak_memory_mb=peak, params=timed.entry.params, flops=timed.entry.flops,
            batch_size=batch_size, device=str(target), dtype=dtype, threads=torch.get_num_threads(), runs=runs, runtime=timed.runtime,
        ))
    for result, seconds in zip(results, timings):
        first = next(index for index, r in enumerate(results) if r.runtime == result.runtime)
        result.ratio = result.images_per_s / results[first].images_per_s
        result.ratio_spread = spread(round_ratios(timings[first], seconds)) if results[first] is not result else 0.0
    return results
