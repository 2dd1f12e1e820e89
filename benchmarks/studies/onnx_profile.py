"""Where ONNX Runtime spends its time in an exported ViT, by operator type.

Used to explain why dynamic int8 speeds a low-rank model up less than the dense one (issue #19):
int8 shortens only the Linear layers' matmuls (``DynamicQuantizeMatMul`` after ONNX Runtime's
fusions, ``MatMul`` before), while attention's own matmuls, softmax, transposes, GELU and layer
norms keep their cost. Low-rank has already shrunk the Linears, so that fixed part is a larger
share of its time.

Each file is run with ONNX Runtime's profiler (CPU, torch's thread count, spinning off as in
``vitslim bench``) on one seeded random batch: ``--warmup`` untimed runs, then ``--runs``
profiled ones. The table gives each operator type's share of the summed kernel time and its
milliseconds per run. The default files are those ``benchmarks/int8.py`` writes for deit_small
and its low-rank 40% model (run it first).

    .venv/bin/python benchmarks/studies/onnx_profile.py
    .venv/bin/python benchmarks/studies/onnx_profile.py my.onnx other.onnx --batch-size 8
    .venv/bin/python benchmarks/studies/onnx_profile.py --saliency   # about 3 minutes

``--saliency`` profiles dinov2-s14's saliency model (backbone plus its convolutional decoder) and
its backbone alone, each float32 and dynamic int8, exported for the run into a temporary folder:
how much of the dense model's time is the decoder, which no ViT compression shortens (issue #28).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import numpy
import torch

OUT = common.RESULTS / "studies" / "onnx_profile"
SALIENCY_OUT = common.RESULTS / "studies" / "onnx_profile_saliency"
INT8_FILES = common.RESULTS / "int8" / "models"
DEFAULT_FILES = [INT8_FILES / f"{model}-{kind}.onnx" for model in ("deit_small", "deit_small low-rank 40%") for kind in ("float32", "int8")]
SHOWN = 8  # operator types listed per file; the rest are summed as "other"


def kernel_times(path: Path, batch_size: int, warmup: int, runs: int) -> tuple[dict[str, float], float]:
    """Milliseconds per run spent in each operator type's kernels, and the median wall time of a run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_input = session.get_inputs()[0]
        images = numpy.random.default_rng(0).standard_normal((batch_size, *graph_input.shape[1:]), dtype=numpy.float32)
        walls = []
        for index in range(warmup + runs):
            started = time.perf_counter()
            session.run(None, {graph_input.name: images})
            walls.append(time.perf_counter() - started)
        events = json.loads(Path(session.end_profiling()).read_text())
    # the profiler records every run; keep the kernels of the last ``runs`` runs only
    run_starts = sorted(event["ts"] for event in events if event.get("cat") == "Session" and event["name"] == "model_run")
    first_timed = run_starts[warmup] if len(run_starts) > warmup else 0
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first_timed:
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return dict(totals), sorted(walls[warmup:])[runs // 2] * 1e3


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("files", nargs="*", default=[str(path) for path in DEFAULT_FILES])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--saliency", action="store_true", help="profile dinov2-s14's saliency model and its backbone instead of files")
    parser.add_argument("--out", default=None, help=f"default {common.shown(OUT)}, or {common.shown(SALIENCY_OUT)} with --saliency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.saliency:
            args.files = saliency_files(Path(scratch))
        profile(parser, args)


def saliency_files(folder: Path) -> list[str]:
    """dinov2-s14's saliency model and its backbone, float32 and dynamic int8, as ONNX files in ``folder``."""
    from dinov2_saliency import load_saliency

    import vitslim
    from vitslim.deploy.export import quantize_onnx_dynamic

    model = load_saliency()
    files = []
    for name, module in (("saliency", model), ("backbone", model.backbone)):
        exported = vitslim.export_onnx(module, folder / f"{name}-float32.onnx")
        files += [str(exported), str(quantize_onnx_dynamic(exported, folder / f"{name}-int8.onnx"))]
    return files


def profile(parser, args) -> None:
    out = Path(args.out or (SALIENCY_OUT if args.saliency else OUT))
    missing = [name for name in args.files if not Path(name).is_file()]
    if missing:
        raise SystemExit(f"no such ONNX file: {missing[0]} (the default files come from benchmarks/int8.py: run it first)")
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for name in args.files:
        totals, wall_ms = kernel_times(Path(name), args.batch_size, args.warmup, args.runs)
        summed = sum(totals.values())
        ranked = sorted(totals.items(), key=lambda item: -item[1])
        shown = ranked[:SHOWN] + ([("other", sum(ms for _, ms in ranked[SHOWN:]))] if len(ranked) > SHOWN else [])
        for op, ms in shown:
            rows.append({"file": Path(name).name, "op": op, "ms_per_run": ms, "share": ms / summed, "wall_ms": wall_ms})
        print(f"{Path(name).name}: {wall_ms:.0f} ms per run; " + ", ".join(f"{op} {ms / summed:.0%}" for op, ms in shown[:4]), flush=True)
    columns = [common.Column("file", "file"), common.Column("op", "operator type"),
               common.Column("ms_per_run", "ms per run", "{:.1f}"), common.Column("share", "share of kernel time", "{:.1%}"),
               common.Column("wall_ms", "wall ms per run (median)", "{:.0f}")]
    text = (f"Command: {common.rerun(parser, args, leave_out=('out',))}. ONNX Runtime {__import__('onnxruntime').__version__} on the "
            f"CPU, {torch.get_num_threads()} intra-op threads, spinning off; batch {args.batch_size} of seeded random images; "
            f"{args.warmup} warm-up runs, then {args.runs} profiled. Kernel times from ONNX Runtime's profiler, per run; the top "
            f"{SHOWN} operator types per file, the rest as 'other'. Ran in {time.perf_counter() - started:.0f} s; the host's "
            f"1-minute load average was {load:.1f} at the start ({os.cpu_count()} cores).")
    lines = common.heading("ONNX Runtime time by operator type", text) + common.markdown_table(columns, rows)
    common.write_table(out / "onnx_profile.md", lines, {"rows": (columns, rows)}, echo=True)


if __name__ == "__main__":
    main()
