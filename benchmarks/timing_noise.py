"""How much a measured speed-up moves within one process and between fresh processes.

Every comparison in the README is timed inside one run, because this shared CPU's speed drifts.
This study shows how much: each of ``--processes`` fresh Python processes loads the same two
models and times them ``--repeats`` times (``vitslim.benchmark``, batch 32, median of
``--runs``), and the table lists every ratio. The default pair is the original reference ViT and
the composition benchmark's low-rank model at 11% of the weights (run benchmarks/compose.py
first), the model whose ratio moved most between that benchmark's runs.

    .venv/bin/python benchmarks/timing_noise.py
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from vitslim.atomic import atomic_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it, quoted for a shell."""
    resolved = Path(path).resolve()
    return shlex.quote(str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path)


def child(args) -> None:
    import vitslim

    models = [(name, vitslim.load_model(name)) for name in (args.reference, args.model)]
    rows = []
    for _ in range(args.repeats):
        reference, compressed = vitslim.benchmark(models, batch_size=32, runs=args.runs, progress=False)
        rows.append({"reference_images_per_s": reference.images_per_s, "ratio": compressed.ratio})
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "results" / "compose" / "models" / "low-rank_alone_11%"))
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "noise"))
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
    reference = "" if args.reference == parser.get_default("reference") else f" --reference {_shown(args.reference)}"
    lines = [
        "# Timing noise: the same two models, timed within and between processes",
        "",
        f"Command: `.venv/bin/python benchmarks/timing_noise.py{reference} --model {_shown(args.model)} --processes {args.processes} "
        f"--repeats {args.repeats} --runs {args.runs} --out {_shown(args.out)}`. "
        f"CPU ({platform.processor() or platform.machine()}), default threads, float32, batch 32, each ratio a median of {args.runs} "
        f"interleaved rounds. Reference `{Path(args.reference.removeprefix('local-dir:')).name}`, model `{Path(args.model).name}`.",
        "",
        "| process | reference images/s | ratios | max/min in the process |",
        "|---|---|---|---|",
    ]
    for index, (rows, spread) in enumerate(zip(processes, spreads), start=1):
        speeds = ", ".join(f"{row['reference_images_per_s']:.0f}" for row in rows)
        shown = ", ".join(f"{row['ratio']:.2f}x" for row in rows)
        lines.append(f"| {index} | {speeds} | {shown} | {spread:.2f} |")
    lines += ["", f"All ratios: {min(ratios):.2f}x to {max(ratios):.2f}x (median {statistics.median(ratios):.2f}x); "
              f"median spread within a process {statistics.median(spreads):.2f}, largest {max(spreads):.2f}."]
    atomic_file(Path(args.out) / "timing_noise.md", lambda partial: partial.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
