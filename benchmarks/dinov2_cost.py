"""``benchmarks/dinov2.py --parts cost``: wall time and peak memory of each compression, in a fresh process."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import torch
from common import Column, Rows
from dinov2_pages import check_settings, in_order, page_text, say, write_page

import vitslim

# --- cost -----------------------------------------------------------------------------------------

def cost_variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    variants = [(f"lowrank-{ratio}", f"low-rank {ratio} (ranks multiples of 8)", "lowrank",
                 {"param_ratio": ratio, "rank_multiple": 8}) for ratio in (0.6, 0.5, 0.4)]
    variants += [("atme-1.5-measured", "ATME 1.5x, measure=True (the CLI default)", "cait",
                  {"speedup": 1.5, "merge": "atme", "measure": True}),
                 ("atme-1.5-planned", "ATME 1.5x, measure=False", "cait",
                  {"speedup": 1.5, "merge": "atme", "measure": False})]
    return [v for v in variants if v[0] != "atme-1.5-measured"] if quick else variants


def status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cost_one(args) -> None:
    """The child of the cost part: one compression, timed and its memory peak read, as JSON on stdout."""
    key, _, method, options = next(v for v in cost_variants(False) if v[0] == args.cost_one)
    original = vitslim.load_model(args.model)
    train = common.open_split(vitslim.describe(original), args.train)
    rss_before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark restarts from the current RSS
        handle.write("5")
    started = time.perf_counter()
    vitslim.compress(original, method, train, calib_images=args.calib_images, seed=args.seed, progress=False, **options)
    seconds = time.perf_counter() - started
    result = {"key": key, "seconds": seconds, "rss_before_mb": rss_before / 1024,
              "peak_rss_mb": status_kb("VmHWM") / 1024,
              "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads()}
    print("COST " + json.dumps(result), flush=True)


def cost_part(parser, args) -> None:
    path = Path(args.out) / "models" / "rows-cost.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "calib_images": args.calib_images, "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "cost", path)
    for key, label, method, options in cost_variants(args.quick):
        if rows.has(key=key):
            continue
        say(f"[cost] {key}: compressing in a fresh subprocess")
        command = [sys.executable, str(Path(__file__).resolve().with_name("dinov2.py")), "--cost-one", key, "--model", args.model,
                   "--train", args.train, "--calib-images", str(args.calib_images), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = [line for line in done.stdout.splitlines() if line.startswith("COST ")]
        if done.returncode != 0 or not found:
            raise SystemExit(f"[cost] {key} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
        result = json.loads(found[-1][len("COST "):])
        row = rows.add({**result, "variant": label, "method": method, "options": options,
                        "extra_mb": result["peak_rss_mb"] - result["rss_before_mb"], "settings": settings})
        say(f"[cost] {key}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB ({row['extra_mb']:+.0f} MB "
            f"over the {row['rss_before_mb']:.0f} MB before compressing)")
    columns = [Column("variant", "compression"), Column("seconds", "wall s", "{:.1f}"),
               Column("peak_rss_mb", "peak RSS MB", "{:.0f}"), Column("rss_before_mb", "RSS before MB", "{:.0f}"),
               Column("extra_mb", "peak - before MB", "{:+.0f}"), Column("threads", "torch threads")]
    table = in_order(rows, [key for key, *_ in cost_variants(False)])
    notes = ["`--quick` leaves out ATME with measure=True (its timing loop alone takes minutes)."] if args.quick else []
    text = page_text(parser, args, "cost", (
        f"Model: `{common.shown(args.model)}` (the classifier, logits). Each compression runs alone in a fresh "
        f"subprocess of this script (`--cost-one KEY`): it loads the model and opens `{common.shown(args.train)}`, "
        f"then `vitslim.compress(model, METHOD, train, calib_images={args.calib_images}, seed={args.seed})`, "
        "training-free. Wall time: `time.perf_counter` around that call alone (it includes decoding the calibration "
        "JPEGs, as the CLI does; model loading excluded). Memory: the resident set's high-water mark (`VmHWM`) reset "
        "just before the call (`echo 5 > /proc/self/clear_refs`) and read after it, so the peak is the compression's "
        "(it includes the model and everything loaded before; `RSS before` is the resident set at the reset). cait "
        "with measure=True times candidate schedules against the original (batch 32, 20 rounds each), which is most "
        "of its time."))
    write_page(args, "cost", "DINOv2 ViT-S/14: time and memory of compressing", text, columns, table, notes=notes,
               settings=settings)
