"""Plain SVD, whitened SVD, and either with layer-wise correction: which part of low-rank compression does the work?

vitslim's ``lowrank`` method is two steps on top of a plain truncated SVD (our reading of arXiv
2402.06004, src/vitslim/lowrank/compress.py): ranks planned from the *whitened* spectrum of every
layer (its output error on calibration activations, weighed by a Fisher sensitivity of the whole
model's loss), and *layer-wise correction* (compensation: each factorised layer refitted, in
execution order, to the inputs the already-compressed prefix gives it). This study takes them
apart on the real DINOv2 ViT-S/14 of ``../shared/models/dinov2-s14`` at several fractions of the
backbone's parameters, all through ``vitslim.compress``:

* ``svd``: method ``svd`` with its defaults (plain SVD of the weights, no activations, no
  sensitivity, no correction);
* ``whitened``: method ``lowrank`` with ``compensation=False`` (whitened SVD factors, Fisher-weighted
  mixed ranks);
* ``whitened + correction``: method ``lowrank`` with its defaults (correction on, each layer's output
  channels weighed by the Fisher sensitivity);
* ``svd + correction``: method ``svd`` with ``compensation=True``, which separates the two effects:
  the ranks come from the plain spectrum (no sensitivity), and the correction refits every
  factorised layer from scratch (the whitened truncation of the layer's least-squares refit; no
  channel weights, as the svd method has no sensitivity), so against ``whitened + correction`` it
  differs only in the rank allocation and the channel weights;
* ``whitened + block``: method ``lowrank`` with 0.4.0's defaults (fc2 also cancels the drift of the
  residual stream, ``compensation_target="block"``); ``block-allocate-all``: the same with every
  calibration token in the statistics (0.4.1's default; the rows above cap them at 12,288 per
  layer, 0.4.0's ``STAT_TOKENS``, through ``statistics_tokens``); ``block``: 0.4.2's default, every
  token for the correction and the ranks allocated from the first 12,288 (``allocation_tokens``);
  ``auto``: the same, the target (block or layer) chosen on a quarter of the calibration images held
  out, then refitted on all (``compensation_target="auto"``);
* two peers at the same parameter budget: ``svd-llm``, the published training-free recipe closest
  to ours (arXiv 2403.07378 as its released code runs it: truncation-aware whitening, the same
  share of every matrix, the closed-form update of each up factor on the compressed prefix's
  inputs; vitslim's baseline method ``svd-llm``), and ``tp``, Torch-Pruning
  (``benchmarks/peers.py``: MLP hidden and head dimensions, keep ratio bisected to the budget;
  Taylor importance on the classifier, L2 on the saliency model).

Every variant keeps ranks at multiples of ``--rank-multiple`` (8, as ``benchmarks/dinov2.py``) and
is calibrated on the same ``--calib-images`` images (256, the benchmarks' default: a seeded subset,
seed ``--seed``, of the task's training images). Two tasks, as ``benchmarks/dinov2.py`` measures them:

* ``dense``: the saliency model (backbone + ``decoder.safetensors``, ``dinov2_saliency.load_saliency``),
  compressed to preserve its map (objective ``auto``: per-pixel MSE). Calibration draws only from
  the ImageNet sample images 0-499 (sorted file order, ``dinov2_dense.dense_data``); the fidelity to
  the original's maps (``vitslim.evaluate`` / ``vitslim.measure.fidelity.MapFidelity``: mean
  per-image Pearson r and cosine, per-pixel MAE, mean per-image IoU of the regions above 0.8) is
  reported on images 500-999.
* ``classification``: the ViT with its linear CIFAR-10 head (objective ``auto``: KL), calibrated on
  CIFAR-10 *train* images; top-1, its change against the original and top-1 agreement with the
  original (and KL) on 2,000 seeded CIFAR-10 *test* images.

No timing (the machine is shared): each row records the compression's wall time and the backbone's
parameter count (the timm ViT, its unused 3,850-parameter CIFAR-10 head included, which is what
``param_ratio`` budgets). No test or report image calibrates or chooses anything.

    .venv/bin/python benchmarks/studies/lowrank_correction.py                       # about an hour on 2 cores
    .venv/bin/python benchmarks/studies/lowrank_correction.py --quick               # tiny counts, a temporary folder

Rows go to ``benchmarks/results/dinov2/lowrank-correction.json`` as they finish (a rerun skips the
rows already there; rows of other settings are refused), the tables to ``lowrank-correction.md``
and every row's raw values to ``lowrank-correction.csv`` beside it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common and the dinov2 helpers

import common
import torch
from common import Column
from dinov2_classification import RememberedOutputs
from dinov2_dense import dense_data, original_maps
from dinov2_saliency import DENSE_SPLIT, IMAGENET, MODEL, THRESHOLD, load_saliency

import vitslim
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import find_step
from vitslim.measure.metrics import count_params
from vitslim.methods import configure

TASKS = ("dense", "classification")
OLD_STATISTICS_TOKENS = 12_288  # the cap on the tokens of every layer's statistics before 0.4.1 (lowrank.calibration.STAT_TOKENS)
# (key, label, method, options beside param_ratio and rank_multiple)
VARIANTS = (
    ("svd", "plain SVD", "svd", {"statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("whitened", "whitened SVD", "lowrank", {"compensation": False, "statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("whitened+correction", "whitened SVD + correction", "lowrank", {"compensation_target": "layer", "statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("svd+correction", "plain SVD + correction", "svd", {"compensation": True, "compensation_target": "layer",
                                                         "statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("whitened+block", "whitened SVD + block-output correction (0.4.0 default)", "lowrank",
     {"compensation_target": "block", "statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("svd-llm-12k", "SVD-LLM (peer), 12,288 statistics tokens", "svd-llm", {"statistics_tokens": OLD_STATISTICS_TOKENS}),
    ("block-allocate-all", "whitened SVD + block-output correction, every token (0.4.1 default)", "lowrank", {"allocation_tokens": 81_920}),
    ("block", "whitened SVD + block-output correction, every token, ranks from 12,288 (default)", "lowrank", {}),
    ("auto", "whitened SVD + correction, target chosen on held-out calibration images", "lowrank", {"compensation_target": "auto"}),
    ("svd-llm", "SVD-LLM (peer), every token", "svd-llm", {}),
    ("tp", "Torch-Pruning, equal params (peer)", "tp", {}),
)
TP_ROUND = 8  # kept channels in multiples of this, as benchmarks/peers.py defaults
TP_BISECTION = 14
TP_IMAGES = 32  # Taylor's gradients come from one batch (peers.py): 256 images at 257 tokens would need ~27 GB
ORDER = [key for key, *_ in VARIANTS]
QUICK = {"dense_train": 16, "dense_report": 8, "calib_images": 16, "test_images": 16, "ratios": [0.5]}
MAP_SCORES = ("pearson", "iou", "mae", "rmse", "cosine", "relative_mse")


def say(text: str) -> None:
    print(text, flush=True)


def settings_of(task: str, args) -> dict:
    """What a task's rows depend on: a resumed run must match it, or its rows would mix."""
    shared = {"model": common.shown(args.model), "calib_images": args.calib_images, "rank_multiple": args.rank_multiple,
              "seed": args.seed, "quick": args.quick}
    if task == "dense":
        return {**shared, "imagenet": common.shown(args.imagenet), "dense_train": args.dense_train, "dense_report": args.dense_report}
    return {**shared, "train": common.shown(args.train), "test": common.shown(args.test), "test_images": args.test_images}


def check_settings(rows: common.Rows, task: str, settings: dict) -> None:
    for row in rows:
        if row["task"] == task and row.get("settings") != settings:
            before = row.get("settings") or {}
            changed = sorted(key for key in set(settings) | set(before) if settings.get(key) != before.get(key))
            raise SystemExit(f"{rows.path} holds {task} rows made with other settings ({', '.join(changed)}): rerun with those "
                             "settings, or choose another --results folder")


def blocked(method: str, options: dict) -> str | None:
    """Why the library refuses this variant's config (None: it accepts it)."""
    if method == "tp":
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            return "torch-pruning is not installed (pip install -e '.[bench]')"
        return None
    try:
        configure(method, param_ratio=0.5, **options)
    except (ParameterError, VitslimError) as error:
        return str(error)
    return None


def plan_notes(compressed) -> dict:
    """What the recipe says the compression did: ranks, factorisation, sensitivity, correction."""
    step = find_step(compressed, "lowrank") or {}
    ranks = list((step.get("ranks") or {}).values())
    return {"factorisation": step.get("factorisation"), "sensitivity": step.get("sensitivity"), "compensation": step.get("compensation"),
            "compensation_target": step.get("compensation_target"), "compensation_target_scores": step.get("compensation_target_scores"),
            "layers_factorised": len(ranks), "rank_min": min(ranks, default=None), "rank_max": max(ranks, default=None),
            "rank_sum": sum(ranks), "ranks": step.get("ranks")}


def prune_to_params(model, ratio: float, train, args, task: str):
    """Torch-Pruning (``benchmarks/peers.py``) at the same parameter budget: the keep ratio of the
    blocks' MLP hidden and head dimensions bisected until the backbone holds at most ``ratio`` of
    its parameters (the largest such). Importance: Taylor on the classifier (its own pseudo-labels on 32 of the calibration images,
    the peer's default); L2 on the saliency model, whose backbone's CIFAR-10 head says nothing
    about the maps (the peer's advice for a model whose logits are not the task)."""
    import peers

    backbone = model.backbone if task == "dense" else model
    limit, total = int(ratio * count_params(backbone)), count_params(backbone)
    images = torch.cat(common.image_batches(train, min(args.calib_images, TP_IMAGES), 16, seed=args.seed))
    importance = "l2" if task == "dense" else "taylor"
    low, high, best = 0.0, 1.0, None
    for _ in range(TP_BISECTION):
        keep = (low + high) / 2
        pruned = peers.prune_with_torch_pruning(backbone, keep, images, importance=importance, round_to=TP_ROUND)
        if count_params(pruned) <= limit:
            low, best = keep, pruned
        else:
            high = keep
    if best is None:
        raise SystemExit(f"Torch-Pruning cannot reach {ratio:g} of {total:,} parameters")
    if task == "dense":
        from dinov2_saliency import wrap
        return wrap(model, best)
    return best


def compress(model, method: str, options: dict, ratio: float, train, args, task: str):
    started = time.perf_counter()
    if method == "tp":
        return prune_to_params(model, ratio, train, args, task), time.perf_counter() - started
    compressed = vitslim.compress(model, method, train, calib_images=args.calib_images, seed=args.seed, progress=args.progress,
                                  param_ratio=ratio, rank_multiple=args.rank_multiple, **options)
    return compressed, time.perf_counter() - started


def run_task(task: str, rows: common.Rows, args) -> None:
    settings = settings_of(task, args)
    check_settings(rows, task, settings)
    todo = [(ratio, variant) for ratio in args.ratios for variant in VARIANTS
            if variant[0] in args.variants and not rows.has(task=task, ratio=ratio, variant=variant[0])]
    if not todo and rows.has(task=task, variant="original"):
        return
    if task == "dense":
        original = load_saliency(args.model)
        backbone_of = lambda model: model.backbone  # noqa: E731
        spec = vitslim.describe(original)
        train, report = dense_data(spec, args)

        def score(model, teacher=None) -> dict:
            result = vitslim.evaluate(model, report, teacher=teacher, limit=args.dense_report, seed=args.seed, batch_size=16,
                                      threshold=THRESHOLD, progress=args.progress)
            return {"images": result["images"], **{name: result.get(name) for name in MAP_SCORES}}
    else:
        original = vitslim.load_model(args.model)
        backbone_of = lambda model: model  # noqa: E731
        spec = vitslim.describe(original)
        train, report = common.open_split(spec, args.train), common.open_split(spec, args.test)

        def score(model, teacher=None) -> dict:
            result = vitslim.evaluate(model, report, teacher=teacher, limit=args.test_images, seed=args.seed, progress=args.progress)
            return {"images": result["images"], "top1": result["top1"], "agreement": result.get("agreement", 1.0),
                    "kl": result.get("kl", 0.0)}
    total = count_params(backbone_of(original))
    teacher = RememberedOutputs(original)  # the original runs once per report batch, whatever the number of variants
    if not rows.has(task=task, variant="original"):
        started = time.perf_counter()
        if task == "dense":
            figures = {"images": None, "pearson": 1.0, "iou": 1.0, "mae": 0.0, "rmse": 0.0, "cosine": 1.0, "relative_mse": 0.0,
                       "coverage": original_maps(original, report, args)}
            figures["images"] = figures["coverage"]["images"]
        else:
            figures = score(original)
        rows.add({"task": task, "ratio": 1.0, "variant": "original", "label": "original", "params": total, "param_fraction": 1.0,
                  "seconds": 0.0, **figures, "settings": settings})
        say(f"[{task}] original: {figures} ({time.perf_counter() - started:.0f} s)")
    first = rows.find(task=task, variant="original")
    for ratio, (key, label, method, options) in todo:
        why = blocked(method, options)
        if why is not None:
            say(f"[{task}] {key} at {ratio:g}: skipped, the library refuses its config: {why}")
            rows.add({"task": task, "ratio": ratio, "variant": key, "label": label, "method": method, "options": options,
                      "skipped": why, "settings": settings})
            continue
        say(f"[{task}] {key} at {ratio:g}: compressing ({method}, param_ratio {ratio:g}, rank_multiple {args.rank_multiple}"
            f"{', ' + ', '.join(f'{k}={v}' for k, v in options.items()) if options else ''})")
        compressed, seconds = compress(original, method, options, ratio, train, args, task)
        figures = score(compressed, teacher)
        params = count_params(backbone_of(compressed))
        row = {"task": task, "ratio": ratio, "variant": key, "label": label, "method": method, "options": options,
               "params": params, "param_fraction": params / total, "seconds": round(seconds, 1), **figures,
               **plan_notes(compressed), "settings": settings}
        if task == "classification":
            row["top1_change"] = row["top1"] - first["top1"]
        rows.add(row)
        shown = (f"pearson {row['pearson']:.4f}, IoU@{THRESHOLD} {row['iou']:.4f}, MAE {row['mae']:.4f}" if task == "dense" else
                 f"top-1 {100 * row['top1']:.2f}% ({100 * row['top1_change']:+.2f}), agreement {100 * row['agreement']:.2f}%, "
                 f"KL {row['kl']:.4f}")
        say(f"[{task}] {key} at {ratio:g}: {shown}; {params:,} params ({100 * params / total:.1f}%), ranks "
            f"{row['rank_min']}-{row['rank_max']} over {row['layers_factorised']} layers; compressed in {seconds:.0f} s")
        del compressed


def fmt_params(value: int) -> str:
    return f"{value / 1e6:.2f} M"


def fmt_ranks(row: dict) -> str:
    return f"{row['layers_factorised']} @ {row['rank_min']}-{row['rank_max']}" if row.get("layers_factorised") else "-"


def table_rows(rows: common.Rows, task: str, ratios: list[float]) -> list[dict]:
    chosen = [row for row in rows if row["task"] == task and (row["variant"] == "original" or row["ratio"] in ratios)]
    shown = []
    for row in sorted(chosen, key=lambda r: (-r["ratio"], ORDER.index(r["variant"]) if r["variant"] in ORDER else -1)):
        shown.append({**row, "ranks_text": fmt_ranks(row), "target": row["ratio"] if row["variant"] != "original" else None,
                      "note": f"skipped: {row['skipped']}" if row.get("skipped") else ""})
    return shown


COMMON_LEFT = [Column("target", "param ratio", "{:g}", "-"), Column("label", "variant")]
COMMON_RIGHT = [Column("params", "backbone params", fmt_params), Column("param_fraction", "of original", "{:.1%}"),
                Column("ranks_text", "factorised layers @ ranks"), Column("seconds", "compress s", "{:.0f}"), Column("note", "note")]
DENSE_COLUMNS = [*COMMON_LEFT, Column("pearson", "Pearson r", "{:.4f}"), Column("iou", f"IoU@{THRESHOLD}", "{:.4f}"),
                 Column("mae", "MAE", "{:.4f}"), Column("cosine", "cosine", "{:.4f}"), *COMMON_RIGHT]
CLASSIFICATION_COLUMNS = [*COMMON_LEFT, Column("top1", "top-1", "{:.2%}"),
                          Column("top1_change", "Δ top-1 (pts)", lambda v: f"{100 * v:+.2f}", "-"),
                          Column("agreement", "agreement", "{:.2%}"), Column("kl", "KL", "{:.4f}"), *COMMON_RIGHT]
CSV_KEYS = ["task", "ratio", "variant", "label", "method", "pearson", "iou", "mae", "rmse", "cosine", "relative_mse", "top1",
            "top1_change", "agreement", "kl", "images", "params", "param_fraction", "seconds", "factorisation", "sensitivity",
            "compensation", "layers_factorised", "rank_min", "rank_max", "rank_sum", "skipped"]


def write_pages(parser, args, rows: common.Rows, out: Path) -> None:
    command = common.rerun(parser, args, leave_out=("progress",))
    lines = common.heading(
        "Low-rank compression of dinov2-s14: plain SVD vs whitened SVD vs either with layer-wise correction",
        f"Command: {command}.\n\n"
        f"Model: `{common.shown(args.model)}` (a real DINOv2 ViT-S/14), every variant through `vitslim.compress` at `param_ratio` of "
        f"the backbone's parameters (the timm ViT, its unused 3,850-parameter CIFAR-10 head included), ranks multiples of "
        f"{args.rank_multiple}, calibrated on the same {args.calib_images} seeded (seed {args.seed}) training images of each task. "
        "Variants: *plain SVD* = method `svd`, defaults (no activations, no sensitivity, no correction); *whitened SVD* = method "
        "`lowrank` with `compensation=False` (whitened SVD factors, ranks by Fisher-weighted whitened energy); *whitened SVD + "
        "correction* = method `lowrank` with `compensation_target=\"layer\"` (0.3's default: the same allocation, then each "
        "factorised layer refitted in execution order to the compressed prefix's inputs, output channels weighed by the Fisher "
        "sensitivity); *plain SVD + correction* = method `svd` with `compensation=True`, layer target (ranks from the plain "
        "spectrum, no sensitivity; the correction refits every factorised layer from scratch, unweighted), which against the "
        "previous row differs only in the rank allocation and channel weights; *whitened SVD + block-output correction* = "
        "method `lowrank`, 0.4's defaults (fc2 also cancels the residual stream's drift). Peers at the same budget: *SVD-LLM* = "
        "method `svd-llm` (arXiv 2403.07378 as its released code runs it: the same whitening, uniform ranks, closed-form update "
        "of each up factor on the compressed prefix's inputs); *Torch-Pruning* = `benchmarks/peers.py` (MLP hidden and head "
        "dimensions in multiples of 8, keep ratio bisected to the budget; Taylor importance on the classifier, L2 on the "
        "saliency model). Every variant caps each layer's statistics at 12,288 tokens (`statistics_tokens`, 0.4.0's cap) except "
        "the *every token* rows (0.4.1's default cap, 81,920: all 256 × 257 tokens; 0.4.2's default allocates the ranks from the "
        "first 12,288 of them, `allocation_tokens`) and Torch-Pruning (no statistics). "
        "Training-free, no timing (a shared machine): `compress s` is the compression's wall time.",
        resumed=True)
    dense, classification = table_rows(rows, "dense", args.ratios), table_rows(rows, "classification", args.ratios)
    if dense:
        original = next((row for row in dense if row["variant"] == "original"), {})
        coverage = original.get("coverage") or {}
        lines += ["## Dense: the saliency model", "",
                  f"Calibration from ImageNet sample images 0-{args.dense_train - 1} (`{common.shown(args.imagenet)}`, sorted file "
                  f"order; {args.calib_images} of them, seeded), objective `auto` (per-pixel MSE of the map). Fidelity to the "
                  f"original's maps on {original.get('images', '?')} images of 500-999 (`vitslim.evaluate` with the original as "
                  f"teacher, `MapFidelity`): mean per-image Pearson r and cosine, per-pixel MAE, mean per-image IoU of the "
                  f"regions above {THRESHOLD} (an image where neither map exceeds it counts 1; the original's maps exceed it on "
                  f"{coverage.get('salient_images', '?')} of the {coverage.get('images', '?')} images).", "",
                  *common.markdown_table(DENSE_COLUMNS, dense), ""]
    if classification:
        original = next((row for row in classification if row["variant"] == "original"), {})
        lines += ["## Classification: the CIFAR-10 linear head", "",
                  f"Calibration: {args.calib_images} seeded CIFAR-10 train images (`{common.shown(args.train)}`), objective `auto` "
                  f"(KL of the logits). Reported on {original.get('images', '?')} seeded CIFAR-10 test images "
                  f"(`{common.shown(args.test)}`, seed {args.seed}), upsampled 32 -> 224 by the model's eval transform; Δ top-1 "
                  "against the original on the same images, agreement and KL against the original's predictions.", "",
                  *common.markdown_table(CLASSIFICATION_COLUMNS, classification), ""]
    markdown = out / "lowrank-correction.md"
    common.write_lines(markdown, lines, echo=True)
    common.write_csv(markdown.with_suffix(".csv"), CSV_KEYS, dense + classification)
    say(f"wrote {markdown}, {markdown.with_suffix('.csv').name}, rows in {rows.path.name}")


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.5, 0.4], help="fractions of the backbone's parameters kept")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--variants", nargs="+", choices=ORDER, default=ORDER, help="which variants to run (the others' rows stay)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--imagenet", default=str(IMAGENET), help="dense: the ImageNet sample images (a plain folder, sorted)")
    parser.add_argument("--train", default=common.CIFAR_TRAIN, help="classification: the calibration split")
    parser.add_argument("--test", default=common.CIFAR_TEST, help="classification: the reported split")
    parser.add_argument("--dense-train", type=int, default=DENSE_SPLIT, help="dense: calibrate from images 0..N-1 (N <= 500)")
    parser.add_argument("--dense-report", type=int, default=DENSE_SPLIT, help="dense: report on N seeded of images 500-999")
    parser.add_argument("--calib-images", type=int, default=256, help="calibration images, the same for every variant")
    parser.add_argument("--test-images", type=int, default=2000, help="classification: seeded CIFAR-10 test images")
    parser.add_argument("--rank-multiple", type=int, default=8, help="ranks rounded to multiples of this (as benchmarks/dinov2.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny counts, one ratio, a temporary folder: an end-to-end check")
    parser.add_argument("--progress", action="store_true", help="vitslim's progress bars")
    parser.add_argument("--results", default=None, help="results folder (default benchmarks/results/dinov2; with --quick a temporary one)")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    out = Path(args.results or (Path(tempfile.gettempdir()) / "lowrank-correction-quick" if args.quick else common.RESULTS / "dinov2"))
    out.mkdir(parents=True, exist_ok=True)
    rows = common.Rows(out / "lowrank-correction.json")
    say(f"results in {out}; tasks {', '.join(args.tasks)}; ratios {', '.join(f'{r:g}' for r in args.ratios)}; "
        f"{torch.get_num_threads()} torch threads")
    started = time.perf_counter()
    for task in TASKS:
        if task in args.tasks:
            task_started = time.perf_counter()
            run_task(task, rows, args)
            say(f"[{task}] done in {time.perf_counter() - task_started:.0f} s")
            write_pages(parser, Namespace(**vars(args)), rows, out)
    say(f"all done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
