"""What every part of ``benchmarks/dinov2.py`` shares: timed compression, row bookkeeping, timing and results pages."""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

import common
import torch
from common import ROOT, Column, Rows
from torch import nn

import vitslim
from vitslim.io.recipe import find_step

# --- helpers ------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


def recipe_notes(model: nn.Module) -> dict:
    """What the recipe says of the merging (schedule, its shape, measured speed-up) and of the sliced channels."""
    notes: dict = {}
    merging = find_step(model, "merging")
    if merging is not None:
        notes.update(schedule=merging["schedule"], concentration=merging.get("concentration"),
                     first_level=merging.get("first_level"), compress_measured_speedup=merging.get("measured_speedup"),
                     tokens_merged=sum(r for _, r, _ in merging["schedule"]["steps"]))
        shape = [f"C {notes['concentration']:g}" if notes["concentration"] is not None else None,
                 f"level {notes['first_level']}" if notes["first_level"] is not None else None]
        notes["shape"] = ", ".join(part for part in shape if part) or None
    channels = find_step(model, "channels")
    if channels is not None:
        notes["widths"] = channels.get("blocks")
        notes["channels"] = widths_text(notes)
    return notes


def widths_text(notes: dict) -> str | None:
    """The kept channel widths over the blocks (CDCP's slicing), e.g. "head dim 48-64, MLP 900-1536"."""
    widths = (notes.get("widths") or {}).values()
    head = [w["head_dim"] for w in widths if "head_dim" in w]
    mlp = [w["mlp_hidden"] for w in widths if "mlp_hidden" in w]
    parts = [f"{name} {min(v)}-{max(v)}" if min(v) != max(v) else f"{name} {v[0]}"
             for name, v in (("head dim", head), ("MLP", mlp)) if v]
    return ", ".join(parts) or None


def timed_compress(model: nn.Module, method: str, images, args, **options) -> tuple[nn.Module, float]:
    """``vitslim.compress`` with this benchmark's shared settings (calibration images, seed,
    progress; cait also ``--measure``), and the seconds it took."""
    if method == "cait":
        options = {**options, "measure": args.measure}
    started = time.perf_counter()
    compressed = vitslim.compress(model, method, images, calib_images=args.calib_images, seed=args.seed,
                                  progress=args.progress, **options)
    return compressed, time.perf_counter() - started


def cdcp_check(label: str, notes: dict, vit: nn.Module, steps: int, lr: float) -> str | None:
    """A warning (printed, and returned for the page) when CDCP sliced no channel at all."""
    widths = (notes.get("widths") or {}).values()
    full = (vit.blocks[0].attn.head_dim, vit.blocks[0].mlp.fc1.out_features)
    if widths and all((w.get("head_dim"), w.get("mlp_hidden")) == full for w in widths):
        warning = (f"{label}: CDCP pruned no channel in {steps} steps at lr {lr:g}; "
                   "the row is ATME at the token share of the target, fine-tuned")
        say(f"[kd] WARNING {warning}")
        return warning
    return None


def stored(path: Path) -> str:
    """``path`` as a row keeps it: relative to the checkout when inside it (``ROOT / stored`` finds it)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_settings(rows: Rows, settings: dict, part: str, path: Path) -> None:
    """A resumed part must have been run with the same settings, or its rows would mix."""
    for row in rows:
        before = row.get("settings") or {}
        if before != settings:
            changed = sorted(key for key in set(settings) | set(before) if settings.get(key) != before.get(key))
            raise SystemExit(f"{path} holds {part} rows made with other settings ({', '.join(changed)}): "
                             "rerun with those settings, or choose another --results folder")


def time_group(rows: Rows, group: list[dict], models: list[tuple[str, nn.Module]], args, label: str, *,
               field: str = "speedup") -> None:
    """One interleaved ``vitslim.benchmark`` run over ``models`` (the original first, named by row
    key); every row of ``group`` gets its model's (or its ``timed_as`` model's) figures; with another
    ``field`` only the speed-up, under that name (the backbones of the dense part)."""
    timing = {"batch_size": args.bench_batch, "runs": args.runs}
    say(f"[{label}] timing {len(models)} models together (batch {args.bench_batch}, {args.runs} interleaved rounds)")
    started = time.perf_counter()
    results = vitslim.benchmark(models, batch_size=args.bench_batch, runs=args.runs, progress=args.progress)
    by_name = {result.model: result for result in results}
    for row in group:
        result = by_name[row.get("timed_as", row["key"])]
        if field != "speedup":
            rows.update(row, **{field: result.ratio})
            continue
        rows.update(row, speedup=result.ratio, images_per_s=result.images_per_s, latency_ms=result.latency_ms,
                    timing=timing, threads=result.threads)
    rows.save()
    say(f"[{label}] timed in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{row['key']} {row[field]:.2f}x" for row in group))


def needs_timing(group: list[dict], args) -> bool:
    return args.retime or any(row.get("timing") != {"batch_size": args.bench_batch, "runs": args.runs} for row in group)


def page_text(parser, args, part: str, text: str) -> str:
    command = common.rerun(parser, Namespace(**{**vars(args), "parts": part}), always=("parts",),
                           leave_out=("progress",))
    return f"Command: {command}.\n\n{text}"


def timing_text(rows: list[dict], args) -> str:
    original = next((row for row in rows if row["key"] == "original" and row.get("images_per_s")), None)
    base = f" (the original: {original['images_per_s']:.1f} images/s)" if original else ""
    return (f"Speed-up: throughput of the whole model against the original's, all of this table's models timed "
            f"together in one interleaved `vitslim.benchmark` run (float32, batch {args.bench_batch}, median of "
            f"{args.runs} rounds, {torch.get_num_threads()} torch threads, random inputs){base}.")


def write_page(args, part: str, title: str, text: str, columns: list[Column], rows: list[dict], *,
               notes: list[str] = (), settings: dict) -> None:
    out = Path(args.out)
    lines = common.heading(title, text, resumed=True) + common.markdown_table(columns, rows) + [""] + list(notes)
    common.write_table(out / f"{part}.md", lines, {"rows": (columns, rows)}, echo=True, settings=settings)
    say(f"wrote {out / part}.md, .json, .csv")


def fmt_speedup(value: float) -> str:
    return f"{value:.2f}x"


def fmt_params(value: int) -> str:
    return f"{value / 1e6:.2f} M"


def in_order(rows, keys: list[str]) -> list[dict]:
    return sorted(rows, key=lambda row: keys.index(row["key"]) if row["key"] in keys else len(keys))


def target_of(options: dict) -> float:
    if "flops_ratio" in options:
        return 1 / options["flops_ratio"]
    return options.get("speedup", options.get("param_ratio"))


def cait_text(args) -> str:
    if args.measure:
        return "timed and tightened while compressing (`--measure`)"
    return "planned by the FLOPs model (`measure=False`)"


MAP_SCORES = ("pearson", "iou", "mae", "rmse", "cosine", "relative_mse", "images")
SCHEDULE_COLUMNS = [Column("tokens_merged", "tokens merged", missing="-"),
                    Column("shape", "schedule shape", missing="-")]
