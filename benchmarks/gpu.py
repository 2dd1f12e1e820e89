"""GPU throughput of the method table: every method's speed-up over the original, per runtime, dtype and batch.

Users deploy on GPUs, in half precision and under ``torch.compile``, not in eager float32 on a
2-core CPU, and a merged or factorised model that is faster on the CPU need not be faster there
(issue #19). This one command measures the method table's ratios where users run:

* geometries: timm ``deit_small_patch16_224`` and ``deit_base_patch16_224`` (random init: speed
  needs no weights, and nothing may download) and ``../shared/models/dinov2-s14`` (real weights;
  skipped, with the reason in the table, when the folder is absent);
* methods: low-rank at 50% and 40% of the parameters, ATME and ToMe at 1.5x and 2.0x planned by
  the FLOPs model, ATME + CDCP at 2.0x, and low-rank 50% composed with ATME 1.5x (below);
* cells: batch 64 and 256, bfloat16 and float32, eager and ``torch.compile``. Each ratio is to the
  original in the same (runtime, dtype, batch) cell, all of the cell's models timed interleaved
  in one run, as docs/protocol.md asks.

How each model is built (once per geometry, on the GPU, before any timing):

* calibration: seeded Gaussian-noise images at the model's input size (no data ships with the
  GPU machine; the choices below are speed-relevant only);
* low-rank: ``vitslim.compress(..., "lowrank", param_ratio=R, rank_multiple=8)``, ranks multiples
  of 8 as tensor cores want them (the README's advice for speed);
* ATME / ToMe: ``vitslim.compress(..., "cait", speedup=S, measure=False, concentration=1)``: the
  FLOPs model plans, nothing is timed while building, and the schedule's shape is fixed (choosing
  it on noise images would choose by noise);
* ATME + CDCP: CDCP's gates need training, which random weights and noise images cannot make
  meaningful; speed depends on the widths alone, so the widths compress_cait's even split gives
  (channels keep S^-1/2 of the blocks' FLOPs) are sliced directly, by weight importance
  (``importance_masks``, as benchmarks/cait.py's throughput part does), and ATME plans the other
  S^1/2 on the sliced model;
* composed: the low-rank 50% model with ATME planned for 1.5x on top, the build order of
  ``lowrank+cait``, with the split fixed instead of probed (its probes price each axis by KL on
  the calibration images, which on noise and random weights says nothing).

Timing: eager cells through ``vitslim.benchmark`` (``device=``, ``dtype=``). Compiled models go
through a local interleaved loop with the same protocol (warm-up, rotating order, synchronised,
median of ``--runs``): ``vitslim.benchmark`` counts FLOPs on the CPU with the model it is given,
which for a compiled module would compile a CPU graph first. Each model is compiled once per
dtype (the batch dimension marked dynamic, so both batch sizes share the compiled graph); the
first call's seconds are recorded as its compile time.

The run keeps to ``--max-minutes`` (default 8): work goes in order of priority (building,
eager cells, then compiled cells, lower precision first) and whatever the budget does not reach
is marked in the table as not reached. Writes ``OUT/gpu.md`` (one table) and ``OUT/gpu.json``.

    .venv/bin/python benchmarks/gpu.py               # a CUDA machine; about 8 minutes at most
    .venv/bin/python benchmarks/gpu.py --cpu-smoke   # no GPU: a tiny ViT, every eager code path, seconds
    .venv/bin/python benchmarks/gpu.py --cpu-smoke --runtimes eager compile   # and the compiled cells, a minute or two

Without a CUDA device the script refuses (exit status 2), unless ``--cpu-smoke`` is given: a tiny
geometry at batches 2 and 4, float32 and bfloat16, eager (and with ``--runtimes eager compile``
compiled, by dynamo's ``eager`` backend unless ``--compile-backend`` says otherwise), written to
a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
import torch
from common import SHARED

import vitslim
from vitslim.cait.importance import importance_masks
from vitslim.cait.slicing import slice_channels
from vitslim.measure import runtimes
from vitslim.measure.bench import DTYPES, check_runs
from vitslim.measure.metrics import count_flops, count_params

DINOV2 = f"local-dir:{SHARED / 'models' / 'dinov2-s14'}"
TIMM_GEOMETRIES = {"deit_small": "deit_small_patch16_224", "deit_base": "deit_base_patch16_224"}
GEOMETRY_TEXT = {"deit_small": "timm deit_small_patch16_224 (random init)", "deit_base": "timm deit_base_patch16_224 (random init)",
                 "dinov2": "dinov2-s14 (its real weights)", "tiny": "a tiny timm ViT (32 pixels, 8x8 patches, 4 blocks, width 48; random init)"}
# --cpu-smoke's geometry: 8x8 patches of 4 pixels, width 48, and 4 blocks, the fewest that merging takes to 2x (2.2x at most)
SMOKE_GEOMETRY = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=3))
CALIBRATION_IMAGES, CALIBRATION_BATCH = 64, 32
SMOKE_CALIBRATION_IMAGES, SMOKE_CALIBRATION_BATCH = 16, 8
WARMUP = 3
RANK_MULTIPLE = 8
LOW_PRECISION_FIRST = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Method:
    """One row of the method table: its name, and how it is built from the original (CPU,
    float32) given the calibration batches, the device to build on and the models built before
    it (a composed row starts from a low-rank one)."""

    name: str
    build: Callable[[torch.nn.Module, list, str, dict], torch.nn.Module]


def _low_rank(ratio: float) -> Callable:
    def build(original, calibration, device, built):
        return vitslim.compress(original, "lowrank", calibration, calib_images=_count(calibration), param_ratio=ratio,
                                rank_multiple=RANK_MULTIPLE, device=device, progress=False)
    return build


def _merging(merge: str, speedup: float) -> Callable:
    def build(original, calibration, device, built):
        return _merged(original, calibration, device, merge, speedup)
    return build


def _merged(model, calibration, device, merge: str, speedup: float) -> torch.nn.Module:
    return vitslim.compress(model, "cait", calibration, speedup=speedup, merge=merge, measure=False, concentration=1.0,
                            device=device, progress=False)


def _atme_cdcp(speedup: float) -> Callable:
    def build(original, calibration, device, built):
        sliced = copy.deepcopy(original)
        slice_channels(sliced, masks=importance_masks(sliced, speedup ** -0.5))
        return _merged(sliced, calibration, device, "atme", speedup ** 0.5)
    return build


def _composed(low_rank: str, speedup: float) -> Callable:
    def build(original, calibration, device, built):
        return _merged(built[low_rank], calibration, device, "atme", speedup)
    return build


METHODS = (
    Method("low-rank 50%", _low_rank(0.5)),
    Method("low-rank 40%", _low_rank(0.4)),
    Method("ATME 1.5x", _merging("atme", 1.5)),
    Method("ATME 2.0x", _merging("atme", 2.0)),
    Method("ToMe 1.5x", _merging("tome", 1.5)),
    Method("ToMe 2.0x", _merging("tome", 2.0)),
    Method("ATME + CDCP 2.0x", _atme_cdcp(2.0)),
    Method("low-rank 50% + ATME 1.5x", _composed("low-rank 50%", 1.5)),
)
ORIGINAL = "original"


def _count(calibration: list) -> int:
    return sum(batch.shape[0] for batch in calibration)


class Budget:
    """The run's wall-clock allowance. New work (a model to build, an eager cell, a model to
    compile) starts only while more than ``RESERVE_S`` of it is left, so that the work in flight,
    at worst one compilation and the timing of its cells, still ends inside the allowance."""

    RESERVE_S = 90.0

    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.seconds = 60 * minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> bool:
        return self.elapsed() < self.seconds - min(self.RESERVE_S, self.seconds / 4)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {message}", flush=True)


# --- models -----------------------------------------------------------------------------------

def load_geometry(name: str, args) -> torch.nn.Module:
    """The original model of a geometry, on the CPU in float32 (random init for timm names)."""
    import timm

    torch.manual_seed(0)
    if name == "tiny":
        timm_name, geometry = SMOKE_GEOMETRY
        return timm.create_model(timm_name, pretrained=False, **geometry).eval()
    if name == "dinov2":
        return vitslim.load_model(args.dinov2).eval()
    return timm.create_model(TIMM_GEOMETRIES[name], pretrained=False).eval()


def dinov2_missing(args) -> str | None:
    """Why the dinov2 geometry cannot run here, or None when its folder is present."""
    folder = Path(args.dinov2.removeprefix("local-dir:"))
    if (folder / "config.json").is_file():
        return None
    return (f"{common.shown(folder)} not found: the folder lives beside the checkout, not in it; copy it to the GPU machine "
            "and pass --dinov2 local-dir:PATH")


def calibration_batches(model: torch.nn.Module, images: int, batch_size: int) -> list[torch.Tensor]:
    size = vitslim.describe(model).preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(min(batch_size, images - start), *size, generator=generator) for start in range(0, images, batch_size)]


def build_models(original: torch.nn.Module, args, budget: Budget) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """Every method's model (on the CPU, float32, original first) and a row per model of what it
    is: parameters, FLOPs per image, build seconds."""
    calibration = calibration_batches(original, *((SMOKE_CALIBRATION_IMAGES, SMOKE_CALIBRATION_BATCH) if args.cpu_smoke
                                                  else (CALIBRATION_IMAGES, CALIBRATION_BATCH)))
    size = vitslim.describe(original).preprocessing.input_size
    built, info = {ORIGINAL: original}, [{"method": ORIGINAL, "params": count_params(original), "flops": count_flops(original, size),
                                          "build_s": 0.0}]
    for method in METHODS:
        if not budget.left():
            info.append({"method": method.name, "skipped": "the time budget ran out before it was built"})
            continue
        start = time.perf_counter()
        model = method.build(original, calibration, args.device, built).eval()
        seconds = time.perf_counter() - start
        built[method.name] = model
        info.append({"method": method.name, "params": count_params(model), "flops": count_flops(model, size), "build_s": round(seconds, 2)})
        log(budget, f"built {method.name} in {seconds:.1f} s")
    return built, info


# --- timing -----------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(call: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated during one call (None on the CPU, where vitslim.benchmark's
    process-wide figure would not separate compiled models either)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    call()
    _sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


@contextlib.contextmanager
def moved_back(models: dict[str, torch.nn.Module], device: str):
    """Afterwards, every model back on the CPU in float32 with its exact float32 weights.

    Timing moves the models to the device and dtype in place, and ``vitslim.benchmark`` counts
    FLOPs with CPU inputs, so each cell must find them on the CPU again. A deep copy per cell is
    no way out: a copied merged model's hooks still point at the original's merging state."""
    saved = {name: model.state_dict() for name, model in models.items()}  # the float32 CPU tensors, kept alive
    try:
        yield
    finally:
        for name, model in models.items():
            model.to("cpu", torch.float32).load_state_dict(saved[name])
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def eager_cell(models: dict[str, torch.nn.Module], batch: int, dtype: str, args) -> list[dict]:
    """One (eager, dtype, batch) cell: every model in one interleaved ``vitslim.benchmark`` run."""
    try:
        with moved_back(models, args.device):
            results = vitslim.benchmark(list(models.items()), batch_size=batch, device=args.device, dtype=dtype, runs=args.runs,
                                        warmup=WARMUP, progress=False)
    except torch.OutOfMemoryError as error:
        return [{"method": name, "skipped": f"out of memory: {str(error).splitlines()[0]}"} for name in models]
    return [{"method": r.model, "images_per_s": r.images_per_s, "ratio": r.ratio, "latency_ms": r.latency_ms,
             "latency_p90_ms": r.latency_p90_ms, "peak_memory_mb": r.peak_memory_mb} for r in results]


def compiled_cells(models: dict[str, torch.nn.Module], batches: list[int], dtype: str, args, budget: Budget) -> dict[int, list[dict]]:
    """The compiled cells of one dtype, one per batch size. Each model is compiled once, by a
    first call at the first batch size with the batch dimension marked dynamic (the other batch
    sizes reuse the graph; a recompilation would show as a long first call), its seconds and
    graph breaks recorded. Then, per batch size, the compiled models are timed interleaved as
    ``vitslim.benchmark`` times (warm-up calls, the order rotating every round, the device
    synchronised around each call, median). A model whose compilation fails or runs out of memory
    gets a row saying so, and so does one that reaches dynamo's recompile limit, past which dynamo
    would quietly run it uncompiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    device, torch_dtype = args.device, DTYPES[dtype]
    size = vitslim.describe(models[ORIGINAL]).preprocessing.input_size
    compiled = {name: runtimes.compiled(model, backend=args.compile_backend) for name, model in models.items()}
    failed: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    graph_breaks: dict[str, int] = {}
    rows: dict[int, list[dict]] = {}

    def inputs(batch: int) -> torch.Tensor:
        images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0)).to(device, torch_dtype)
        torch._dynamo.maybe_mark_dynamic(images, 0)
        return images

    def first_call(name: str, images: torch.Tensor) -> float | None:
        """Seconds of a model's first call with ``images`` (None, and the reason kept, if it fails)."""
        start = time.perf_counter()
        try:
            compiled[name](images)
            _sync(device)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit,
                RuntimeError) as error:  # OutOfMemoryError is a RuntimeError
            failed[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            log(budget, f"compiled {name} ({dtype}) failed: {failed[name]}")
            return None
        return time.perf_counter() - start

    with (moved_back(models, device), torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True),
          torch.inference_mode()):
        for model in models.values():
            model.to(device, torch_dtype)
        images = inputs(batches[0])
        for name in compiled:
            if not budget.left():
                failed[name] = "the time budget ran out before it was compiled"
                continue
            breaks_before = sum(counters["graph_break"].values())
            seconds = first_call(name, images)
            if seconds is not None:
                compile_s[name], graph_breaks[name] = seconds, sum(counters["graph_break"].values()) - breaks_before
        log(budget, f"compiled {len(compile_s)} models ({dtype}): " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in compile_s.items()))
        for batch in batches:
            images = inputs(batch)
            first_calls = {name: first_call(name, images) for name in compile_s if name not in failed}
            timed = [name for name, seconds in first_calls.items() if seconds is not None]
            timings = _interleaved({name: compiled[name] for name in timed}, images, args.runs, device)
            base = statistics.median(timings[ORIGINAL]) if ORIGINAL in timings else None
            cell = []
            for name in models:
                if name not in timed:
                    cell.append({"method": name, "skipped": failed.get(name, "not compiled")})
                    continue
                median = statistics.median(timings[name])
                cell.append({"method": name, "images_per_s": batch / median, "ratio": None if base is None else base / median,
                             "latency_ms": median * 1e3, "latency_p90_ms": statistics.quantiles(timings[name], n=10)[-1] * 1e3,
                             "peak_memory_mb": _peak_memory_mb(lambda call=compiled[name]: call(images), device),
                             "compile_s": round(compile_s[name], 2), "first_call_s": round(first_calls[name], 3),
                             "graph_breaks": graph_breaks[name]})
            rows[batch] = cell
    torch._dynamo.reset()
    return rows


def _interleaved(calls: dict[str, Callable], images: torch.Tensor, runs: int, device: str) -> dict[str, list[float]]:
    """Seconds of every call of every model: ``WARMUP`` untimed calls each, then ``runs`` rounds,
    each round calling every model once, the order rotated by one each round (docs/protocol.md)."""
    names = list(calls)
    for name in names:
        for _ in range(WARMUP):
            calls[name](images)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            calls[name](images)
            _sync(device)
            timings[name].append(time.perf_counter() - start)
    return timings


# --- the table ----------------------------------------------------------------------------------

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def cell_key(runtime: str, dtype: str, batch: int) -> str:
    return f"{runtime} {SHORT_DTYPE[dtype]} b{batch}"


def ratio_text(row: dict | None) -> str:
    if row is None:
        return "not reached"
    if "skipped" in row:
        return "—"
    if row["ratio"] is None:
        return f"({row['images_per_s']:,.0f} img/s)"
    text = f"{row['ratio']:.2f}x"
    return f"{text} ({row['images_per_s']:,.0f} img/s)" if row["method"] == ORIGINAL else text


def device_text(args) -> str:
    if torch.device(args.device).type == "cuda":
        properties = torch.cuda.get_device_properties(0)
        return (f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}; float32 matmuls at precision '{torch.get_float32_matmul_precision()}' "
                f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
    return f"CPU ({common.cpu_name()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}: a smoke run, not a GPU measurement"


def write(out: Path, rows: list[dict], built: list[dict], skipped: dict[str, str], cells: list[str], args, parser, budget: Budget) -> Path:
    """``gpu.md`` (one table: a row per geometry and method, a column per cell) and ``gpu.json``
    (every measured row, the build rows, the settings)."""
    by_model = {}
    for row in rows:
        by_model.setdefault((row["geometry"], row["method"]), {})[row["cell"]] = row
    table = [
        "| geometry | method | params | FLOPs / image | build s | " + " | ".join(cells) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in cells) + " |",
    ]
    notes = []
    for entry in built:
        if "skipped" in entry:
            notes.append(f"{entry['geometry']} {entry['method']}: not built, {entry['skipped']}")
            continue
        measured = by_model.get((entry["geometry"], entry["method"]), {})
        table.append(f"| {entry['geometry']} | {entry['method']} | {entry['params'] / 1e6:.2f} M | {entry['flops'] / 1e9:.2f} G | "
                     f"{entry['build_s']:.1f} | " + " | ".join(ratio_text(measured.get(cell)) for cell in cells) + " |")
        notes += [f"{entry['geometry']} {entry['method']}, {cell}: {row['skipped']}" for cell, row in measured.items() if "skipped" in row]
    notes += [f"{geometry}: skipped, {reason}" for geometry, reason in skipped.items()]
    settings = (f"Speed-ups are ratios of images/s to the original in the same (runtime, dtype, batch) cell, every model of a cell timed "
                f"interleaved in one run: median of {args.runs} rounds after {WARMUP} warm-up calls, random inputs. The original's "
                "row gives its images/s. Eager cells: `vitslim.benchmark`; compiled cells: `torch.compile` "
                f"(backend {args.compile_backend}, default mode, batch dimension dynamic, one compilation per model and dtype) "
                "timed by the same protocol in this script. Geometries: "
                + "; ".join(f"{name}, {GEOMETRY_TEXT[name]}" for name in args.geometries)
                + ". Calibration on seeded noise images. How each row is built: the docstring of benchmarks/gpu.py. "
                f"Command: {common.rerun(parser, args, always=('runs',))}. Wall time: {budget.elapsed() / 60:.1f} min "
                f"(budget {args.max_minutes:g}).")
    lines = [*common.heading("Throughput ratios of the method table on a GPU" if not args.cpu_smoke else "GPU benchmark, CPU smoke run",
                             settings), f"Device: {device_text(args)}.", "", *table]
    if any("| not reached" in line for line in table):
        notes.append(f"not reached: the --max-minutes {args.max_minutes:g} budget ran out before that cell started; "
                     "a larger --max-minutes measures it")
    if notes:
        lines += ["", "Not measured:", "", *(f"- {note}" for note in notes)]
    out.mkdir(parents=True, exist_ok=True)
    common.write_lines(out / "gpu.md", lines, echo=True)
    common.write_json(out / "gpu.json", {"machine": common.machine(), "device": device_text(args), "command": common.rerun(parser, args, always=("runs",)),
                                         "settings": {"geometries": args.geometries, "runs": args.runs, "warmup": WARMUP, "batch_sizes": args.batch_sizes, "dtypes": args.dtypes,
                                                      "runtimes": args.runtimes, "compile_backend": args.compile_backend,
                                                      "max_minutes": args.max_minutes, "wall_s": round(budget.elapsed(), 1)},
                                         "skipped": skipped, "models": built, "rows": rows})
    return out / "gpu.md"


# --- the run ----------------------------------------------------------------------------------

def parse(argv: list[str] | None = None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU needed: a tiny ViT at batches 2 and 4 on the CPU, every code path")
    parser.add_argument("--geometries", nargs="+", choices=["deit_small", "deit_base", "dinov2", "tiny"], default=None,
                        help="in order of priority; default: deit_small deit_base dinov2 (tiny with --cpu-smoke)")
    parser.add_argument("--dinov2", default=DINOV2, help="the dinov2-s14 folder (local-dir:PATH)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 64 256 (2 4 with --cpu-smoke)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--runtimes", nargs="+", choices=["eager", "compile"], default=None,
                        help="default: eager compile (eager with --cpu-smoke: dynamo traces slowly on a CPU)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile's backend (default: inductor; eager with --cpu-smoke)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per cell (the protocol's minimum is 20)")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="the run's allowance: no new work starts in its last 90 s, so the run ends inside it")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu (a temporary folder with --cpu-smoke)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.geometries = args.geometries or (["tiny"] if smoke else ["deit_small", "deit_base", "dinov2"])
    args.batch_sizes = args.batch_sizes or ([2, 4] if smoke else [64, 256])
    args.runtimes = args.runtimes or (["eager"] if smoke else ["eager", "compile"])
    args.compile_backend = args.compile_backend or ("eager" if smoke else "inductor")
    args.device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        parser.error(f"no CUDA device: torch {torch.__version__} sees none, and this benchmark measures GPU speed. "
                     "Run it on a CUDA machine, or pass --cpu-smoke for a quick check of every code path on the CPU")
    if "tiny" in args.geometries and not smoke:
        parser.error("the tiny geometry is --cpu-smoke's; a GPU run measures deit_small, deit_base and dinov2")
    try:
        check_runs(args.runs)
    except vitslim.VitslimError as error:
        parser.error(str(error))
    return parser, args


def _ratios(measured: list[dict]) -> str:
    return ", ".join(f"{row['method']} {row['ratio']:.2f}x" for row in measured if row.get("ratio") is not None)


def main(argv: list[str] | None = None) -> Path:
    parser, args = parse(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vitslim-gpu-smoke-")) if args.cpu_smoke else common.RESULTS / "gpu"
    budget = Budget(args.max_minutes)
    skipped = {}
    geometries = {}
    for geometry in args.geometries:
        reason = dinov2_missing(args) if geometry == "dinov2" else None
        if reason:
            skipped[geometry] = reason
            continue
        original = load_geometry(geometry, args)
        models, info = build_models(original, args, budget)
        geometries[geometry] = (models, [{"geometry": geometry, **entry} for entry in info])
    dtypes = sorted(args.dtypes, key=LOW_PRECISION_FIRST.index)
    cells = [cell_key(runtime, dtype, batch) for runtime in args.runtimes for dtype in dtypes for batch in args.batch_sizes]
    rows = []
    if "eager" in args.runtimes:
        for dtype in dtypes:
            for geometry, (models, _) in geometries.items():
                for batch in args.batch_sizes:
                    if not budget.left():
                        continue
                    cell = cell_key("eager", dtype, batch)
                    measured = eager_cell(models, batch, dtype, args)
                    rows += [{"geometry": geometry, "cell": cell, "runtime": "eager", "dtype": dtype, "batch": batch, **row} for row in measured]
                    log(budget, f"{geometry} {cell}: " + _ratios(measured))
    if "compile" in args.runtimes:
        for dtype in dtypes:
            for geometry, (models, _) in geometries.items():
                if not budget.left():
                    continue
                for batch, measured in compiled_cells(models, args.batch_sizes, dtype, args, budget).items():
                    cell = cell_key("compile", dtype, batch)
                    rows += [{"geometry": geometry, "cell": cell, "runtime": "compile", "dtype": dtype, "batch": batch, **row} for row in measured]
                    log(budget, f"{geometry} {cell}: " + _ratios(measured))
    built = [entry for _, info in geometries.values() for entry in info]
    return write(out, rows, built, skipped, cells, args, parser, budget)


if __name__ == "__main__":
    main()
