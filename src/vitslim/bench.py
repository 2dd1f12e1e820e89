"""Throughput, latency and memory, measured by the protocol in docs/protocol.md.

All models run in one process, in interleaved rounds (the order rotates each round), so slow
drift of a shared machine (thermal, other tenants) hits every model alike and the ratios stay
honest even when the absolute numbers move.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitslim.adapters import describe
from vitslim.errors import VitslimError
from vitslim.metrics import count_flops, count_params
from vitslim.progress import track

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchResult:
    model: str
    images_per_s: float
    ratio: float  # throughput relative to the first model of the same run
    latency_ms: float  # median time of one batch
    latency_p90_ms: float
    peak_memory_mb: float  # peak RSS of the process (CPU) or max allocated (CUDA) while running it
    params: int
    flops: int  # per image
    batch_size: int
    device: str
    dtype: str
    threads: int
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


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


def _peak_memory_mb(model: nn.Module, images: torch.Tensor, device: torch.device) -> float:
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            model(images)
            _sync(device)
            return torch.cuda.max_memory_allocated(device) / 2**20
        _reset_peak_rss()
        model(images)
        return _peak_rss_mb()


MIN_RUNS = 20


def check_runs(runs: int) -> None:
    if runs < MIN_RUNS:
        raise VitslimError(f"--runs must be at least {MIN_RUNS}: fewer timed runs give medians too noisy to compare")


def benchmark(
    models: list[tuple[str, nn.Module]],
    *,
    batch_size: int = 32,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    warmup: int = 3,
    runs: int = 20,
    progress: bool = True,
) -> list[BenchResult]:
    """Median images/s of each model on random inputs of its own input size, plus the ratio to
    the first model. At least 20 timed runs per model are taken, as the protocol requires."""
    if not models:
        raise VitslimError("bench needs at least one model")
    if batch_size < 1:
        raise VitslimError("--batch-size must be at least 1")
    check_runs(runs)
    if dtype not in DTYPES:
        raise VitslimError(f"unknown dtype {dtype}; choose one of {', '.join(DTYPES)}")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise VitslimError("--device cuda asked for, but this torch sees no CUDA device")
    if threads is not None:
        if threads < 1:
            raise VitslimError("--threads must be at least 1")
        torch.set_num_threads(threads)
    prepared = []
    for name, model in models:
        spec = describe(model)
        flops = count_flops(model, spec.preprocessing.input_size)
        model = model.to(target, DTYPES[dtype]).eval()
        images = torch.randn(batch_size, *spec.preprocessing.input_size, generator=torch.Generator().manual_seed(0)).to(target, DTYPES[dtype])
        prepared.append((name, model, images, flops))
    timings: dict[str, list[float]] = {name: [] for name, *_ in prepared}
    with torch.inference_mode():
        for _, model, images, _ in prepared:
            for _ in range(warmup):
                model(images)
        _sync(target)
        for round_index in track(range(runs), "benchmarking", unit="round", show=progress):
            shift = round_index % len(prepared)
            for name, model, images, _ in prepared[shift:] + prepared[:shift]:
                _sync(target)
                start = time.perf_counter()
                model(images)
                _sync(target)
                timings[name].append(time.perf_counter() - start)
    results = []
    for name, model, images, flops in prepared:
        median = statistics.median(timings[name])
        p90 = statistics.quantiles(timings[name], n=10)[-1]
        results.append(BenchResult(
            model=name, images_per_s=batch_size / median, ratio=1.0, latency_ms=median * 1e3, latency_p90_ms=p90 * 1e3,
            peak_memory_mb=_peak_memory_mb(model, images, target), params=count_params(model), flops=flops,
            batch_size=batch_size, device=str(target), dtype=dtype, threads=torch.get_num_threads(), runs=runs,
        ))
    for result in results:
        result.ratio = result.images_per_s / results[0].images_per_s
    return results
