"""How much a measured speed-up moves within one process and between fresh processes.

Every comparison in docs/ is timed inside one run, because this shared CPU's speed drifts.
This study shows how much: each of ``--processes`` fresh Python processes loads the same two
models and times them ``--repeats`` times (``vitslim.benchmark``, batch 32, median of
``--runs``), and the table lists every ratio. The default pair is the original reference ViT and
the composition benchmark's low-rank model at 11% of the weights (run benchmarks/compose.py
first), the model whose ratio moved most between that benchmark's runs.

    .venv/bin/python benchmarks/studies/timing_noise.py

Writes ``OUT/timing_noise.md`` (the table), ``OUT/timing_noise.json`` (every ratio, per process,
with the machine) and ``OUT/timing_noise.csv`` (one row per process and repeat).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common

CSV_KEYS = ("process", "repeat", "reference_images_per_s", "ratio")


def child(args) -> None:
    import vitslim

    models = [(name, vitslim.load_model(name)) for name in (args.reference, args.model)]
    rows = []
    for _ in range(args.repeats):
        reference, compressed = vitslim.benchmark(models, batch_size=32, runs=args.runs, progress=False)
        rows.append({"reference_images_per_s": reference.images_per_s, "ratio": compressed.ratio})
    print(json.dumps(rows))


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--reference", default=common.REFERENCE_MODEL)
    parser.add_argument("--model", default=str(common.RESULTS / "compose" / "models" / "low-rank_alone_11%"))
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(common.RESULTS / "noise"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from vitslim.errors import VitslimError

        try:
            child(args)
        except VitslimError as error:
            sys.exit(str(error))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"{args.model} does not exist: run benchmarks/compose.py first, or pass --model FOLDER")
    command = [sys.executable, __file__, "--child", "--reference", args.reference, "--model", args.model,
               "--repeats", str(args.repeats), "--runs", str(args.runs)]
    processes = []
    for index in range(args.processes):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"timing process {index + 1} failed:\n{done.stderr.strip()[-2000:]}")
        processes.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"process {index + 1}/{args.processes}: " + ", ".join(f"{row['ratio']:.2f}x" for row in processes[-1]), flush=True)
    ratios = [row["ratio"] for rows in processes for row in rows]
    spreads = [max(r["ratio"] for r in rows) / min(r["ratio"] for r in rows) for rows in processes]
    run = common.rerun(parser, args, always=("model", "processes", "repeats", "runs", "out"))
    info = common.machine()
    lines = [
        *common.heading("Timing noise: the same two models, timed within and between processes",
                        f"Command: {run}. Default threads, float32, batch 32, each ratio a median of {args.runs} interleaved rounds. "
                        f"Reference `{Path(args.reference.removeprefix('local-dir:')).name}`, model `{Path(args.model).name}`.", info=info),
        "| process | reference images/s | ratios | max/min in the process |",
        "|---|---|---|---|",
    ]
    for index, (rows, spread) in enumerate(zip(processes, spreads), start=1):
        speeds = ", ".join(f"{row['reference_images_per_s']:.0f}" for row in rows)
        shown = ", ".join(f"{row['ratio']:.2f}x" for row in rows)
        lines.append(f"| {index} | {speeds} | {shown} | {spread:.2f} |")
    lines += ["", f"All ratios: {min(ratios):.2f}x to {max(ratios):.2f}x (median {statistics.median(ratios):.2f}x); "
              f"median spread within a process {statistics.median(spreads):.2f}, largest {max(spreads):.2f}."]
    out = Path(args.out)
    common.write_lines(out / "timing_noise.md", lines, echo=True)
    common.write_json(out / "timing_noise.json", {"machine": info, "command": run.strip("`"), "reference": common.shown(args.reference),
                                                  "model": common.shown(args.model), "repeats": args.repeats, "runs": args.runs,
                                                  "processes": processes})
    common.write_csv(out / "timing_noise.csv", CSV_KEYS, [{"process": index, "repeat": repeat, **row}
                                                          for index, rows in enumerate(processes, start=1)
                                                          for repeat, row in enumerate(rows, start=1)])


if __name__ == "__main__":
    main()
