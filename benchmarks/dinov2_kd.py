"""``benchmarks/dinov2.py --parts kd``: compression with a distillation budget, against Torch-Pruning."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import common
import torch
from common import ROOT, Column, Rows
from dinov2_dense import dense_data, load_saved_saliency
from dinov2_pages import (
    MAP_SCORES,
    cait_text,
    cdcp_check,
    check_settings,
    fmt_params,
    fmt_speedup,
    needs_timing,
    page_text,
    recipe_notes,
    say,
    stored,
    target_of,
    time_group,
    timed_compress,
)
from dinov2_saliency import THRESHOLD, SaliencyModel, load_saliency, wrap
from safetensors.torch import load_file, save_file
from torch import nn

import vitslim
from vitslim.cait.speed import measured_speedup
from vitslim.io import image_batches
from vitslim.measure.metrics import count_params

DENSE_KD_PEERS = (("dense-tome-kd", "ToMe 2.0", "cait", {"speedup": 2.0, "merge": "tome"}),
                  ("dense-window-kd", "2x2 windows 2.0", "cait", {"speedup": 2.0, "merge": "window"}),
                  ("dense-lowrank-kd", "low-rank 0.5", "lowrank", {"param_ratio": 0.5, "rank_multiple": 8}))
# issue #18's KD budget for the classifier: at most 2 epochs on at most 5,000 train images
TARGET_KD_IMAGES, TARGET_KD_EPOCHS = 5000, 2
QUICK_TP_ROUNDS = 2  # Torch-Pruning's bisection: measurements at most (its default is 6)



# --- KD -------------------------------------------------------------------------------------------

def load_peers():
    """``benchmarks/peers.py``'s Torch-Pruning functions, or the reason they cannot be used."""
    try:
        import peers

        return (peers.prune_with_torch_pruning, peers.prune_to_speedup), None
    except ImportError as error:
        return None, f"benchmarks/peers.py cannot be imported ({error})"
    except AttributeError as error:
        return None, f"benchmarks/peers.py lacks a function ({error})"


def tp_rebuild(prune, original_vit: nn.Module, template: SaliencyModel | None, row: dict,
               images: torch.Tensor) -> nn.Module:
    """A saved Torch-Pruning model back: the same pruning (which gives the widths) then its weights;
    put into a copy of the saliency model ``template`` unless it is None (the plain classifier)."""
    pruned = prune(original_vit, row["keep_ratio"], images, importance=row["importance"])
    model = pruned if template is None else wrap(template, pruned)
    model.load_state_dict(load_file(str(ROOT / row["weights"])), strict=True)
    return model.eval()


def save_weights(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def kd_dense(rows: Rows, args, settings: dict, recovery: vitslim.Training, models_dir: Path) -> tuple[str, str | None]:
    """The saliency model's KD rows; returns its KD budget and why Torch-Pruning was skipped (None: it ran)."""
    teacher = load_saliency(args.model)
    train, report = dense_data(vitslim.describe(teacher), args)
    steps = math.ceil(len(train) / args.kd_batch) * args.kd_epochs
    budget = f"{len(train)} images x {args.kd_epochs} epochs ({steps} steps of {args.kd_batch})"

    def finish(key: str, label: str, model: nn.Module, seconds: float, kd: str, **fields) -> dict:
        score = vitslim.evaluate(model, report, teacher=teacher, limit=args.dense_report, seed=args.seed, batch_size=16,
                                 threshold=THRESHOLD, progress=args.progress)
        row = rows.add({"key": key, "task": "dense", "variant": label, "kd": kd,
                        **{name: score.get(name) for name in MAP_SCORES},
                        "params": count_params(model.backbone), "flops": score["flops"], "seconds": seconds, **fields,
                        "settings": settings})
        say(f"[kd] {key}: pearson {row['pearson']:.4f}, IoU@{THRESHOLD} {row['iou']:.4f}, MAE {row['mae']:.4f}; "
            f"{seconds:.0f} s")
        return row

    def cait(**options) -> nn.Module:
        return vitslim.compress(teacher, "cait", train, calib_images=args.calib_images, seed=args.seed,
                                progress=args.progress, speedup=2.0, merge="atme", measure=args.measure, **options)

    if not rows.has(key="dense-original"):
        rows.add({"key": "dense-original", "task": "dense", "variant": "original", "kd": "-", "pearson": 1.0,
                  "iou": 1.0, "mae": 0.0, "cosine": 1.0, "params": count_params(teacher.backbone), "seconds": 0.0,
                  "settings": settings})
    if not rows.has(key="dense-cdcp"):
        say(f"[kd] dense-cdcp: ATME+CDCP 2.0x, gates trained with KD over {budget}")
        started = time.perf_counter()
        model = cait(gate_training=recovery)
        seconds = time.perf_counter() - started
        measured = measured_speedup(teacher, model, batch_size=args.bench_batch)
        say(f"[kd] dense-cdcp: measured {measured:.2f}x against the original (batch {args.bench_batch})")
        folder = vitslim.save(model, models_dir / "dense-cdcp")
        notes = recipe_notes(model)
        warning = cdcp_check("dense ATME+CDCP", notes, teacher.backbone, steps, args.kd_lr)
        finish("dense-cdcp", "ATME+CDCP", model, seconds, budget, target=2.0, build_speedup=measured,
               folder=stored(folder), warning=warning, **notes)
    if not rows.has(key="dense-atme-kd"):
        say(f"[kd] dense-atme-kd: ATME 2.0x + KD recovery over {budget}")
        started = time.perf_counter()
        model = cait(recovery=recovery)
        seconds = time.perf_counter() - started
        folder = vitslim.save(model, models_dir / "dense-atme-kd")
        finish("dense-atme-kd", "ATME + KD", model, seconds, budget, target=2.0, folder=stored(folder),
               **recipe_notes(model))
    # the training-free part's other methods at the same KD: ToMe and the 2x2 windows at the same
    # FLOPs target, low-rank at half the backbone
    for key, label, method, options in (() if args.quick else DENSE_KD_PEERS):
        if rows.has(key=key):
            continue
        say(f"[kd] {key}: {label} + KD recovery over {budget}")
        model, seconds = timed_compress(teacher, method, train, args, recovery=recovery, **options)
        folder = vitslim.save(model, models_dir / key)
        finish(key, f"{label} + KD", model, seconds, budget, target=target_of(options), folder=stored(folder),
               **recipe_notes(model))

    functions, skipped = load_peers()
    tp_images = torch.stack([train[index][0] for index in range(min(32, len(train)))])
    if functions is None:
        say(f"[kd] Torch-Pruning skipped: {skipped}")
    elif not rows.has(key="dense-tp-kd"):
        _, to_speedup = functions
        target = args.tp_target or rows.find(key="dense-cdcp")["build_speedup"]
        source = "--tp-target" if args.tp_target else "the CDCP result's measured speed-up"
        if target <= 1:
            raise SystemExit(f"[kd] Torch-Pruning cannot aim at {target:.2f}x ({source}), no speed-up: time with a "
                             "larger --bench-batch, or give --tp-target")
        say(f"[kd] dense-tp: Torch-Pruning ({args.tp_importance} importance) bisected to {target:.2f}x, {source}")
        started = time.perf_counter()

        def measure(original: nn.Module, candidate: nn.Module) -> float:  # the whole saliency model's speed-up
            return measured_speedup(teacher, wrap(teacher, candidate), batch_size=args.bench_batch)

        rounds = {"rounds": QUICK_TP_ROUNDS} if args.quick else {}
        pruned, measured, keep = to_speedup(teacher.backbone, target, tp_images, importance=args.tp_importance,
                                            measure=measure, **rounds)
        model = wrap(teacher, pruned)
        prune_seconds = time.perf_counter() - started
        say(f"[kd] dense-tp: keep ratio {keep:.3f}, measured {measured:.2f}x")
        fields = {"target": round(target, 3), "target_from": source, "keep_ratio": keep,
                  "importance": args.tp_importance, "build_speedup": measured}
        finish("dense-tp", "Torch-Pruning", model, prune_seconds, "-", timed_as="dense-tp-kd", **fields)
        started = time.perf_counter()
        vitslim.distill(model, teacher, train, recovery)
        weights = save_weights(model, models_dir / "dense-tp-kd.safetensors")
        finish("dense-tp-kd", "Torch-Pruning + KD", model, prune_seconds + time.perf_counter() - started, budget,
               weights=stored(weights), **fields)

    group = [row for row in rows if row["task"] == "dense"]
    if needs_timing(group, args):
        models = [("dense-original", teacher)]
        for row in group:
            if "folder" in row:
                models.append((row["key"], load_saved_saliency(row, args)))
            elif "weights" in row:
                if functions is None:
                    raise SystemExit(f"[kd] {row['key']} needs Torch-Pruning to be rebuilt for timing: {skipped}")
                models.append((row["key"], tp_rebuild(functions[0], teacher.backbone, teacher, row, tp_images)))
        time_group(rows, group, models, args, "kd, dense")
    return budget, skipped


def kd_classification(rows: Rows, args, settings: dict, recovery: vitslim.Training, models_dir: Path) -> str | None:
    """The CIFAR-10 classifier's KD rows; returns why Torch-Pruning was skipped (None: it ran)."""
    original = vitslim.load_model(args.model)
    spec = vitslim.describe(original)
    train, test = common.open_split(spec, args.train), common.open_split(spec, args.test)
    kd_train = image_batches.select(train, limit=args.kd_images, seed=args.seed)
    steps = math.ceil(len(kd_train) / args.kd_batch) * args.kd_epochs
    budget = f"{len(kd_train)} images x {args.kd_epochs} epochs ({steps} steps of {args.kd_batch})"
    if not rows.has(key="cls-original"):
        score = vitslim.evaluate(original, test, limit=args.test_images, seed=args.seed, progress=args.progress)
        rows.add({"key": "cls-original", "task": "classification", "variant": "original", "kd": "-",
                  "top1": score["top1"], "agreement": 1.0, "kl": 0.0, "images": score["images"],
                  "params": score["params"], "seconds": 0.0, "settings": settings})

    def finish(key: str, label: str, model: nn.Module, seconds: float, kd: str, **fields) -> dict:
        score = vitslim.evaluate(model, test, teacher=original, limit=args.test_images, seed=args.seed,
                                 progress=args.progress)
        row = rows.add({"key": key, "task": "classification", "variant": label, "kd": kd, "top1": score["top1"],
                        "agreement": score["agreement"], "kl": score["kl"], "images": score["images"],
                        "params": score["params"], "seconds": seconds, **fields, "settings": settings})
        say(f"[kd] {key}: top-1 {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%, KL {row['kl']:.4f}; "
            f"{seconds:.0f} s")
        return row

    for key, label, method, options in kd_classification_variants(recovery, args):
        if rows.has(key=key):
            continue
        say(f"[kd] {key}: {label}, KD over {budget}")
        model, seconds = timed_compress(original, method, kd_train, args, **options)
        fields = {}
        if "gate_training" in options:
            fields["build_speedup"] = measured_speedup(original, model, batch_size=args.bench_batch)
            say(f"[kd] {key}: measured {fields['build_speedup']:.2f}x against the original (batch {args.bench_batch})")
        folder = vitslim.save(model, models_dir / key)
        notes = recipe_notes(model)
        warning = cdcp_check(f"classification {label}", notes, original, steps, args.kd_lr) \
            if "gate_training" in options else None
        finish(key, label, model, seconds, budget, target=target_of(options), folder=stored(folder), **notes,
               warning=warning, **fields)

    if args.kd_full_budget and not rows.has(key="cls-lowrank-kd-full"):
        full_train = image_batches.select(train, limit=TARGET_KD_IMAGES, seed=args.seed)
        full_recovery = dataclasses.replace(recovery, epochs=TARGET_KD_EPOCHS)
        full_steps = math.ceil(len(full_train) / args.kd_batch) * TARGET_KD_EPOCHS
        full_budget = f"{len(full_train)} images x {TARGET_KD_EPOCHS} epochs ({full_steps} steps of {args.kd_batch})"
        say(f"[kd] cls-lowrank-kd-full: low-rank 0.5 + KD over the target's whole budget, {full_budget}")
        model, seconds = timed_compress(original, "lowrank", full_train, args, param_ratio=0.5, rank_multiple=8,
                                        recovery=full_recovery)
        folder = vitslim.save(model, models_dir / "cls-lowrank-kd-full")
        finish("cls-lowrank-kd-full", "low-rank 0.5 + KD (the target's budget)", model, seconds,
               full_budget, target=0.5, folder=stored(folder))

    functions, skipped = load_peers()
    tp_images = torch.stack([kd_train[index][0] for index in range(min(32, len(kd_train)))])
    if functions is None:
        say(f"[kd] classification Torch-Pruning skipped: {skipped}")
    elif not rows.has(key="cls-tp-kd"):
        _, to_speedup = functions
        target = args.tp_target or rows.find(key="cls-cdcp")["build_speedup"]
        source = "--tp-target" if args.tp_target else "the ATME+CDCP classifier's measured speed-up"
        if target <= 1:
            raise SystemExit(f"[kd] Torch-Pruning cannot aim at {target:.2f}x ({source}): time with a larger "
                             "--bench-batch, or give --tp-target")
        importance = "taylor"  # the classifier has logits, Torch-Pruning's recommended importance for ViTs applies
        say(f"[kd] cls-tp: Torch-Pruning ({importance} importance) bisected to {target:.2f}x, {source}")
        started = time.perf_counter()
        rounds = {"rounds": QUICK_TP_ROUNDS} if args.quick else {}
        model, measured, keep = to_speedup(
            original, target, tp_images, importance=importance,
            measure=lambda first, candidate: measured_speedup(first, candidate, batch_size=args.bench_batch), **rounds)
        prune_seconds = time.perf_counter() - started
        say(f"[kd] cls-tp: keep ratio {keep:.3f}, measured {measured:.2f}x")
        fields = {"target": round(target, 3), "target_from": source, "keep_ratio": keep, "importance": importance,
                  "build_speedup": measured}
        finish("cls-tp", "Torch-Pruning", model, prune_seconds, "-", timed_as="cls-tp-kd", **fields)
        started = time.perf_counter()
        vitslim.distill(model, original, kd_train, recovery)
        weights = save_weights(model, models_dir / "cls-tp-kd.safetensors")
        finish("cls-tp-kd", "Torch-Pruning + KD", model, prune_seconds + time.perf_counter() - started, budget,
               weights=stored(weights), **fields)

    group = [row for row in rows if row["task"] == "classification"]
    if needs_timing(group, args):
        models = [("cls-original", original)]
        for row in group:
            if "folder" in row:
                models.append((row["key"], vitslim.load_model(str(ROOT / row["folder"]))))
            elif "weights" in row:
                if functions is None:
                    raise SystemExit(f"[kd] {row['key']} needs Torch-Pruning to be rebuilt for timing: {skipped}")
                models.append((row["key"], tp_rebuild(functions[0], original, None, row, tp_images)))
        time_group(rows, group, models, args, "kd, classification")
    return skipped


def kd_classification_variants(recovery: vitslim.Training, args) -> list[tuple[str, str, str, dict]]:
    """(key, label, method, options) of the classifier's KD rows: low-rank at each ratio then
    recovery, and ATME+CDCP with gates trained by KD (the composed model is on the classification
    page, training-free)."""
    lowrank = [(f"cls-lowrank-{ratio}-kd" if ratio != 0.5 else "cls-lowrank-kd", f"low-rank {ratio} + KD", "lowrank",
                {"param_ratio": ratio, "rank_multiple": 8, "recovery": recovery}) for ratio in (0.6, 0.5, 0.4, 0.3)]
    variants = lowrank + [("cls-cdcp", "ATME+CDCP 1.9x", "cait",
                           {"speedup": 1.9, "merge": "atme", "gate_training": recovery, "measure": args.measure})]
    return [v for v in variants if v[0] in ("cls-lowrank-kd", "cls-cdcp")] if args.quick else variants


def kd_part(parser, args) -> None:
    models_dir = Path(args.out) / "models" / "kd"
    path = Path(args.out) / "models" / "rows-kd.json"
    rows = Rows(path)
    settings = {"model": common.shown(args.model), "dense_train": args.dense_train, "dense_report": args.dense_report,
                "kd_images": args.kd_images, "kd_epochs": args.kd_epochs, "kd_lr": args.kd_lr,
                "kd_batch": args.kd_batch, "calib_images": args.calib_images, "test_images": args.test_images,
                "measure": args.measure, "tp_importance": args.tp_importance, "tp_target": args.tp_target,
                "seed": args.seed, "quick": args.quick}
    check_settings(rows, settings, "kd", path)
    recovery = vitslim.Training(epochs=args.kd_epochs, lr=args.kd_lr, batch_size=args.kd_batch, seed=args.seed,
                                progress=args.progress)
    _, skipped = kd_dense(rows, args, settings, recovery, models_dir)
    cls_skipped = kd_classification(rows, args, settings, recovery, models_dir)

    dense_rows = [row for row in rows if row["task"] == "dense"]
    cls_rows = [row for row in rows if row["task"] == "classification"]
    common_columns = [Column("params", "params", fmt_params), Column("speedup", "measured speed-up", fmt_speedup),
                      Column("channels", "channels kept", missing="-"), Column("seconds", "compress + KD s", "{:.0f}"),
                      Column("key", "key")]
    dense_columns = [Column("variant", "variant"), Column("kd", "KD budget"), Column("pearson", "pearson", "{:.4f}"),
                     Column("iou", f"IoU@{THRESHOLD}", "{:.4f}"), Column("mae", "MAE", "{:.4f}"),
                     Column("cosine", "cosine", "{:.4f}"), *common_columns]
    cls_columns = [Column("variant", "variant"), Column("kd", "KD budget"), Column("top1", "top-1", "{:.2%}"),
                   Column("agreement", "agreement", "{:.2%}"), Column("kl", "KL", "{:.4f}"), *common_columns]
    tp = rows.find(key="dense-tp-kd")
    cdcp = rows.find(key="dense-cdcp")
    tp_text = (f"Torch-Pruning (`benchmarks/peers.py`: MLP hidden channels and head dimensions inside the blocks, "
               f"{tp['importance']} importance) bisected to {tp['target']:.2f}x ({tp['target_from']}; the ATME+CDCP "
               f"model measured {cdcp['build_speedup']:.2f}x when it was made, batch {args.bench_batch}), keep ratio "
               f"{tp['keep_ratio']:.3f}; its plain ViT put into a copy of the saliency model and distilled with "
               f"`vitslim.distill` on the map, the same KD as CDCP's gate training. {tp['importance']} importance "
               "(`--tp-importance`) because Torch-Pruning's Taylor scores come from the backbone's CIFAR-10 logits, "
               "which the saliency model does not use. The row without KD is the same architecture (timed as the KD "
               "row)." if tp else f"Torch-Pruning: skipped ({skipped}).")
    cls_tp = rows.find(key="cls-tp-kd")
    cls_tp_text = (f"Torch-Pruning on the classifier: {cls_tp['importance']} importance (its recommendation for ViTs; "
                   f"the gradients of the classifier's own predictions), bisected to {cls_tp['target']:.2f}x "
                   f"({cls_tp['target_from']}), keep ratio {cls_tp['keep_ratio']:.3f}, then the same KD as recovery."
                   if cls_tp else f"Torch-Pruning on the classifier: skipped ({cls_skipped}).")
    text = page_text(parser, args, "kd", (
        f"Model: `{common.shown(args.model)}`. KD: `vitslim.Training(epochs={args.kd_epochs}, lr={args.kd_lr:g}, "
        f"batch_size={args.kd_batch}, seed={args.seed})` (AdamW, warm-up then cosine), both for CDCP's gate training "
        f"and for recovery after compression; each row states its budget (images x epochs, steps). `vitslim.distill` "
        f"trains the whole student: for the saliency model the decoder too, its BatchNorm layers in train mode (their "
        f"running statistics move to the student's features).\n\n"
        f"**Dense** (the saliency model, objective per-pixel MSE): trained on images 0-{args.dense_train - 1} of "
        f"`{common.shown(args.imagenet)}` (sorted; {args.calib_images} of them, seeded, choose the merge schedule), "
        f"reported on {cdcp['images'] if cdcp else '-'} of images 500-999 (seeded when fewer than 500): fidelity to "
        f"the original's maps as on the dense page. cait targets 2.0x, {cait_text(args)}. {tp_text}\n\n"
        f"**Classification** (the plain ViT, objective KL): KD over {args.kd_images} seeded CIFAR-10 train images "
        f"(seed {args.seed}; {args.calib_images} of them calibrate), reported on {args.test_images} seeded test images "
        f"as on the classification page. Low-rank keeps 0.6 / 0.5 / 0.4 / 0.3 of the parameters (ranks multiples of "
        f"8), then recovery; ATME+CDCP 1.9x, {cait_text(args)}, gates trained by the KD. With `--kd-full-budget`, low-rank 0.5 "
        f"also over the issue's whole KD budget ({TARGET_KD_EPOCHS} epochs on {TARGET_KD_IMAGES} seeded train images, "
        f"the same settings otherwise). {cls_tp_text}\n\n"
        f"Speed-up: each table's models timed together in one interleaved `vitslim.benchmark` run (float32, batch "
        f"{args.bench_batch}, median of {args.runs} rounds, {torch.get_num_threads()} torch threads), against the "
        f"original of that table. Params: the backbone's for the dense table, the ViT's for the classification one."))
    lines = common.heading("DINOv2 ViT-S/14: compression with a distillation budget", text, resumed=True)
    lines += ["## Dense (saliency model)", ""] + common.markdown_table(dense_columns, dense_rows)
    lines += ["", "## Classification (CIFAR-10 head)", ""] + common.markdown_table(cls_columns, cls_rows) + [""]
    lines += [line for row in rows if row.get("warning") for line in (f"**Warning.** {row['warning']}.", "")]
    out = Path(args.out)
    tables = {"dense": (dense_columns, dense_rows), "classification": (cls_columns, cls_rows)}
    common.write_table(out / "kd.md", lines, tables, echo=True, settings=settings)
    say(f"wrote {out / 'kd'}.md, .json, .csv (dense) and -classification.csv")
