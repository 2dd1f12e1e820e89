"""The ``vitslim`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from vitslim.errors import VitslimError
from vitslim.table import human, percent, render

DISTRIBUTED_COMMANDS = {"compress", "eval"}  # the others time models or write many files: one process


def _load(spec: str, pretrained: bool = False):
    from vitslim.loading import load_model

    return load_model(spec, pretrained=pretrained)


def _positive(name: str):
    def check(ctx, param, value):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}", param_hint=name)
        return value

    return check


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitslim")
@click.option("-v", "--verbose", is_flag=True, help="Log what vitslim does (to stderr).")
def cli(verbose: bool) -> None:
    """Compress pretrained Vision Transformers and measure the result.

    MODEL is a timm model name (random init unless --pretrained), a timm folder
    (local-dir:PATH or PATH with config.json + model.safetensors), a Hugging Face ViT folder,
    or a folder written by vitslim.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    from vitslim import distributed

    distributed.init_from_environment()
    if distributed.active():
        command = click.get_current_context().invoked_subcommand
        if command not in DISTRIBUTED_COMMANDS:
            raise VitslimError(f"vitslim {command} runs in one process; launch it without torchrun "
                               f"(under torchrun: {', '.join(sorted(DISTRIBUTED_COMMANDS))})")
        if not distributed.is_main():  # one report, from rank 0; errors still reach stderr
            sys.stdout = open(os.devnull, "w")


def _save(model, out) -> None:
    """Write the result on rank 0 alone (every process when not under torchrun)."""
    from vitslim.distributed import on_main
    from vitslim.persist import save

    click.echo(f"saved to {on_main(lambda: save(model, Path(out)))}")


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, help="ImageFolder directory, a zip of one, or a CSV (file,label) beside its images; "
                                             "with --teacher also a plain folder of unlabelled images (agreement and KL only).")
@click.option("--limit", type=int, callback=_positive("--limit"), help="Evaluate a seeded random subset of N images.")
@click.option("--skip", type=int, default=0, show_default=True, help="Leave out the first N images of the seeded order (e.g. those used for calibration).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset order.")
@click.option("--teacher", help="Reference model: adds top-1 agreement and mean KL (no labels needed).")
@click.option("--batch-size", type=int, default=64, show_default=True, callback=_positive("--batch-size"))
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--pretrained", is_flag=True, help="Download pretrained weights for a timm name (needs a reachable hub).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def eval_command(model, data, limit, skip, seed, teacher, batch_size, workers, device, pretrained, as_json):
    """Accuracy, parameters and FLOPs of MODEL on labelled images (with --teacher: agreement and KL, on any images)."""
    from vitslim.evaluate import evaluate
    from vitslim.metrics import folder_bytes
    from vitslim.folder_io import WEIGHTS_FILE

    student = _load(model, pretrained)
    reference = _load(teacher, pretrained) if teacher else None
    result = evaluate(student, data, teacher=reference, limit=limit, skip=skip, seed=seed, batch_size=batch_size, workers=workers, device=device)
    if (Path(model.removeprefix("local-dir:")) / WEIGHTS_FILE).is_file():
        result["bytes"] = folder_bytes(Path(model.removeprefix("local-dir:")))
    if as_json:
        click.echo(json.dumps(result))
        return
    rows = [["top-1", percent(result["top1"])], [f"top-{result.get('top5_is_top', 5)}", percent(result["top5"])]] if "top1" in result else []
    rows += [["images", f"{result['images']}" + (f" ({result['skipped']} unreadable, skipped)" if result["skipped"] else "")],
             ["params", human(result["params"])], ["FLOPs / image", human(result["flops"])]]
    if "agreement" in result:
        rows += [["top-1 agreement", percent(result["agreement"])], ["mean KL", f"{result['kl']:.4f}"]]
    if "bytes" in result:
        rows.append(["bytes on disk", human(result["bytes"]) + "B"])
    click.echo(render(["metric", model], rows))


@cli.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive("--batch-size"))
@click.option("--threads", type=int, callback=_positive("--threads"), help="torch intra-op threads (default: torch's choice).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed rounds per model (at least 20).")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list, one object per model.")
def bench_command(models, batch_size, threads, device, dtype, runs, warmup, as_json):
    """Throughput, latency and memory of MODELS, interleaved in one process; ratios are to the first."""
    from vitslim.bench import benchmark

    loaded = [(spec, _load(spec)) for spec in models]
    results = benchmark(loaded, batch_size=batch_size, threads=threads, device=device, dtype=dtype, runs=runs, warmup=warmup)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
        return
    first = results[0]
    click.echo(f"device {first.device}, {first.threads} threads, batch {first.batch_size}, {first.dtype}, median of {first.runs} interleaved runs")
    rows = [[r.model, f"{r.images_per_s:.1f}", f"{r.ratio:.2f}x", f"{r.latency_ms:.1f}", f"{r.peak_memory_mb:.0f}", human(r.params), human(r.flops)] for r in results]
    click.echo(render(["model", "images/s", "ratio", "latency ms", "peak MB", "params", "FLOPs/img"], rows))


def _model_and_calibration(model, like, params, data, calib_images, seed, batch_size):
    """The original model, the parameter budget (``--like`` resolved), the training images and a
    seeded calibration subset of ``calib_images`` of them as batches."""
    from vitslim import data as imagedata
    from vitslim.adapters import describe
    from vitslim.metrics import count_params

    original = _load(model)
    if like is not None:
        params = count_params(_load(like))
    spec = describe(original)
    dataset = imagedata.open_images(data, imagedata.build_transform(spec.preprocessing), class_names=spec.label_names, labels_required=False)
    if len(dataset) < calib_images:
        raise VitslimError(f"{data} holds {len(dataset)} images, fewer than --calib-images {calib_images}")
    return original, params, dataset, imagedata.make_loader(imagedata.select(dataset, limit=calib_images, seed=seed), batch_size)


@cli.command("compress")
@click.argument("model")
@click.option("--data", required=True, help="Calibration images (train split, never the images you report on): class folders, "
                                             "a zip, a CSV, or a plain folder of unlabelled images (none of the methods needs labels).")
@click.option("--out", required=True, help="Output folder (model.safetensors + recipe.json + config.json).")
@click.option("--method", type=click.Choice(["lowrank", "svd", "asvd", "cait", "lowrank+cait"]), default="lowrank", show_default=True,
              help="lowrank: activation-aware whitened SVD (svd, asvd: its baselines in the same code path); "
                   "cait: token merging (ATME) plus, with --epochs, consistent channel pruning (CDCP); "
                   "lowrank+cait: all three axes, the target split between them by measured cost.")
@click.option("--speedup", type=float, help="cait, lowrank+cait: target throughput, times the original's (measured after compression).")
@click.option("--flops-ratio", type=float, help="lowrank+cait: keep at most this fraction of the original's FLOPs per image.")
@click.option("--recovery-epochs", type=int, default=0, show_default=True,
              help="lowrank+cait: distil the original into the composed model for E epochs once it is built.")
@click.option("--merge", type=click.Choice(["atme", "tome"]), default="atme", show_default=True, help="cait: token merging method (tome: the ToMe baseline).")
@click.option("--token-speedup", type=float, help="cait: the share of --speedup given to token merging (default: its square root when channels are pruned, all of it otherwise).")
@click.option("--channel-ratio", type=float, help="cait: fraction of the blocks' FLOPs the channel gates keep (default: what --speedup leaves after tokens).")
@click.option("--concentration", type=float,
              help="cait, lowrank+cait: how front-loaded the merge schedule is (block i's share of the merged tokens weighs (depth-1-i)^C; 0 spreads evenly). "
                   "Default: the C of 1, 2 or 4 whose schedule keeps the original's logits best on --calib-images of --data.")
@click.option("--consistent/--unconstrained", default=True, show_default=True, help="cait: one channel mask shared by all heads (CDCP), or per-head masks (the ablation).")
@click.option("--param-ratio", type=float, help="Keep this fraction of the whole model's parameters (0 < R < 1).")
@click.option("--params", type=int, help="Keep this many parameters.")
@click.option("--like", help="Keep as many parameters as this timm model has (e.g. deit_small_patch16_224).")
@click.option("--allocation", type=click.Choice(["mixed", "uniform"]), default="mixed", show_default=True)
@click.option("--sensitivity", type=click.Choice(["fisher", "none"]), help="Per-layer error weights for mixed allocation (default: fisher for lowrank, none for the baselines).")
@click.option("--compensation/--no-compensation", default=None, help="Refit each factorised layer to the compressed prefix's inputs (default: on for lowrank, off for the baselines).")
@click.option("--rank-multiple", type=int, default=1, show_default=True, callback=_positive("--rank-multiple"), help="Round ranks to multiples of k (8 or 16 keep matmuls fast).")
@click.option("--calib-images", type=int, default=256, show_default=True, callback=_positive("--calib-images"), help="Calibration images, a seeded subset of --data.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive("--batch-size"))
@click.option("--finetune-epochs", "--epochs", "finetune_epochs", type=int, default=0, show_default=True,
              help="Distil the original into the result for E epochs over all of --data (cait: trains the channel gates; 0 = training-free token merging).")
@click.option("--finetune-lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate of the fine-tune (warm-up, then cosine).")
@click.option("--checkpoints", help="Folder for the fine-tune's per-epoch checkpoints (pickle-free).")
@click.option("--resume", is_flag=True, help="Continue the fine-tune from the last checkpoint in --checkpoints.")
@click.option("--int8", is_flag=True, help="Finally quantise every Linear's weights to int8 (per output channel): about 4x fewer bytes on disk.")
@click.option("--device", default="cpu", show_default=True, help="Where calibration and distillation run (cuda: under torchrun, each rank's own GPU).")
def compress_command(model, data, out, method, speedup, flops_ratio, recovery_epochs, merge, token_speedup, channel_ratio, concentration, consistent, param_ratio, params, like, allocation, sensitivity,
                     compensation, rank_multiple, calib_images, seed, batch_size, finetune_epochs, finetune_lr, checkpoints, resume, int8, device):
    """Compress MODEL to one budget (parameters, or speed-up for cait) and save it to --out."""
    from vitslim.lowrank.compress import compress_lowrank
    from vitslim.metrics import count_params
    from vitslim.persist import STEPS_ATTR, check_output_folder
    from vitslim.quantize import quantize_int8
    from vitslim.train import distill

    if finetune_epochs < 0:
        raise VitslimError("--finetune-epochs must be 0 or more")
    if resume and not checkpoints:
        raise VitslimError("--resume needs --checkpoints, the folder the interrupted fine-tune wrote")
    if (checkpoints or resume) and not (finetune_epochs or recovery_epochs):
        raise VitslimError("--checkpoints and --resume belong to the fine-tune; give --epochs/--finetune-epochs too")
    if method == "lowrank+cait":
        _compress_composed(model, data, out, device=device, speedup=speedup, flops_ratio=flops_ratio, param_ratio=param_ratio, params=params, like=like,
                           channel_ratio=channel_ratio, merge=merge, concentration=concentration, epochs=finetune_epochs, recovery_epochs=recovery_epochs,
                           calib_images=calib_images, lr=finetune_lr, batch_size=batch_size, seed=seed, checkpoints=checkpoints, resume=resume,
                           stray=[name for name, value in (("--token-speedup", token_speedup), ("--int8", int8 or None),
                                                           ("--allocation", None if allocation == "mixed" else allocation), ("--sensitivity", sensitivity),
                                                           ("--compensation/--no-compensation", compensation),
                                                           ("--rank-multiple", None if rank_multiple == 1 else rank_multiple),
                                                           ("--unconstrained", None if consistent else True)) if value is not None])
        return
    if flops_ratio is not None or recovery_epochs:
        raise VitslimError("--flops-ratio and --recovery-epochs belong to --method lowrank+cait")
    if method == "cait":
        _compress_cait(model, data, out, device=device, speedup=speedup, merge=merge, token_speedup=token_speedup, channel_ratio=channel_ratio,
                       concentration=concentration, consistent=consistent, calib_images=calib_images, epochs=finetune_epochs, lr=finetune_lr,
                       batch_size=batch_size, seed=seed, checkpoints=checkpoints, resume=resume,
                       stray=[name for name, value in (("--param-ratio", param_ratio), ("--params", params), ("--like", like), ("--int8", int8 or None)) if value is not None])
        return
    if speedup is not None or token_speedup is not None or channel_ratio is not None or concentration is not None:
        raise VitslimError("--speedup, --token-speedup, --channel-ratio and --concentration belong to --method cait; low-rank methods take a parameter budget")
    if sum(option is not None for option in (param_ratio, params, like)) != 1:
        raise VitslimError("state exactly one budget: --param-ratio, --params or --like")
    check_output_folder(out)
    original, params, dataset, batches = _model_and_calibration(model, like, params, data, calib_images, seed, batch_size)
    original.to(device)
    factorisation = {"lowrank": "whitened", "svd": "svd", "asvd": "asvd"}[method]
    compressed = compress_lowrank(original, batches, param_ratio=param_ratio, params=params, method=factorisation,
                                  allocation=allocation, sensitivity=sensitivity, compensation=compensation, rank_multiple=rank_multiple, min_images=calib_images)
    step = getattr(compressed, STEPS_ATTR)[-1]
    rows = [[name, str(step["ranks"].get(name, "dense")), f"{100 * kept:.1f}%"] for name, kept in step["kept_energy"].items()]
    click.echo(render(["layer", "rank", "kept energy"], rows))
    before, after = count_params(original), count_params(compressed)
    click.echo(f"params {before:,} -> {after:,} ({100 * after / before:.1f}%, target {step['target_params']:,})")
    if finetune_epochs:
        distill(compressed, original, dataset, epochs=finetune_epochs, lr=finetune_lr, batch_size=batch_size, seed=seed, device=device,
                checkpoint_dir=checkpoints, resume=resume)
    compressed.to("cpu")
    if int8:
        compressed = quantize_int8(compressed)
        click.echo("weights quantised to int8 (per output channel)")
    _save(compressed, out)


def _compress_cait(model, data, out, *, device, speedup, merge, token_speedup, channel_ratio, concentration, consistent, calib_images, epochs, lr, batch_size,
                   seed, checkpoints, resume, stray):
    from vitslim import data as imagedata
    from vitslim.adapters import describe
    from vitslim.cait.compress import compress_cait
    from vitslim.cait.patch import merge_schedule
    from vitslim.metrics import count_params
    from vitslim.persist import STEPS_ATTR, check_output_folder

    if stray:
        raise VitslimError(f"{', '.join(stray)} do not apply to --method cait, which takes --speedup (and --epochs)")
    if speedup is None:
        raise VitslimError("--method cait needs --speedup S (S > 1, a multiple of the original's throughput)")
    check_output_folder(out)
    original = _load(model)
    spec = describe(original)
    dataset = imagedata.open_images(data, imagedata.build_transform(spec.preprocessing), class_names=spec.label_names, labels_required=False)
    compressed = compress_cait(original, dataset, speedup=speedup, epochs=epochs, merge=merge, token_speedup=token_speedup, channel_ratio=channel_ratio,
                               concentration=concentration, calib_images=calib_images, consistent=consistent, lr=lr, batch_size=batch_size, seed=seed,
                               device=device, checkpoint_dir=checkpoints, resume=resume)
    steps = {step["method"]: step for step in getattr(compressed, STEPS_ATTR, [])}
    schedule = merge_schedule(compressed)
    if schedule is not None:
        click.echo(render(["block", "tokens merged after it", "level"], [[str(b), str(r), str(level) if merge == "atme" else "-"] for b, r, level in schedule.steps]))
        merging = steps["merging"]
        scores = merging.get("concentration_kl")
        click.echo(f"schedule concentration {merging['concentration']:g}"
                   + (f" (KL to the original on the calibration images: {', '.join(f'{c}: {kl:.4f}' for c, kl in scores.items())})" if scores else ""))
    if "channels" in steps:
        widths = steps["channels"]["blocks"]
        click.echo(render(["block", "head dim", "MLP hidden"], [[index, str(w.get("head_dim", "-")), str(w.get("mlp_hidden", "-"))] for index, w in widths.items()]))
    measured = steps.get("merging", {}).get("measured_speedup")
    click.echo(f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x (target {speedup:g}x)" if measured else ""))
    _save(compressed, out)


def _compress_composed(model, data, out, *, device, speedup, flops_ratio, param_ratio, params, like, channel_ratio, merge, concentration, epochs, recovery_epochs,
                       calib_images, lr, batch_size, seed, checkpoints, resume, stray):
    from vitslim.compose import compress_composed
    from vitslim.metrics import count_params
    from vitslim.persist import STEPS_ATTR, check_output_folder

    if stray:
        raise VitslimError(f"{', '.join(stray)} do not apply to --method lowrank+cait")
    if recovery_epochs < 0:
        raise VitslimError("--recovery-epochs must be 0 or more")
    if sum(option is not None for option in (param_ratio, params, like)) > 1:
        raise VitslimError("state the parameter budget once: --param-ratio, --params or --like")
    if speedup is None and flops_ratio is None and param_ratio is None and params is None and like is None:
        raise VitslimError("--method lowrank+cait needs a target: state a target with --speedup, --flops-ratio, --param-ratio, --params or --like")
    check_output_folder(out)
    original, params, dataset, calibration = _model_and_calibration(model, like, params, data, calib_images, seed, batch_size)
    original.to(device)
    compressed = compress_composed(original, calibration, dataset, speedup=speedup, flops_ratio=flops_ratio, param_ratio=param_ratio,
                                   params=params, epochs=epochs, finetune_epochs=recovery_epochs, channel_ratio=channel_ratio, merge=merge,
                                   concentration=concentration, lr=lr, batch_size=batch_size, seed=seed, device=device, checkpoint_dir=checkpoints, resume=resume)
    steps = {step["method"]: step for step in getattr(compressed, STEPS_ATTR, [])}
    split = steps["composed"]
    click.echo(render(["axis", "level", "probe cost (KL)", "probe FLOPs ratio", "probe speed-up"],
                      [[probe["axis"], f"{probe['level']:g}", f"{probe['cost']:.4f}", f"{probe['flops_ratio']:.2f}",
                        "not timed" if probe["speedup"] is None else f"{probe['speedup']:.2f}x"]
                       for probe in split["probes"] if probe["level"] == split["levels"][probe["axis"]]]))
    measured = split.get("measured_speedup")
    click.echo(f"split: {', '.join(f'{axis} {level:g}' for axis, level in split['levels'].items())}; "
               f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x" if measured else ""))
    _save(compressed, out)


@cli.command("sweep")
@click.argument("model")
@click.option("--data", required=True, help="Train images: calibration (and KD with --epochs); never scored; labels not needed.")
@click.option("--eval-data", required=True, help="Held-out labelled images every point is scored on.")
@click.option("--budgets", multiple=True, required=True,
              help="METHOD=V[,V...], repeatable: lowrank/svd/asvd take fractions of the parameters kept, cait/tome take speed-ups, "
                   "lowrank+cait takes FLOPs reduction factors with an optional parameter cap (2@0.5: half the FLOPs and at most half the parameters).")
@click.option("--out", required=True, help="Sweep folder: points.json, models/, report.md, pareto.png. Rerun with the same --out to resume.")
@click.option("--reference", "references", multiple=True, help="Another model to mark on the plots (e.g. a smaller one of the same family).")
@click.option("--calib-images", type=int, default=256, show_default=True, callback=_positive("--calib-images"))
@click.option("--eval-limit", type=int, callback=_positive("--eval-limit"), help="Score on a seeded subset of this many held-out images.")
@click.option("--epochs", type=int, default=0, show_default=True, help="KD epochs per point (cait: trains the channel gates too; lowrank+cait: E epochs of channel gates "
                   "when its split prunes channels, then E of distillation of the composed model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive("--batch-size"))
@click.option("--runs", type=int, default=20, show_default=True, help="Timed rounds of the final speed run (at least 20).")
def sweep_command(model, data, eval_data, budgets, out, references, calib_images, eval_limit, epochs, seed, batch_size, runs):
    """Compress MODEL over a grid of methods and budgets; score, time and plot every point."""
    from vitslim.sweep import run_sweep

    if epochs < 0:
        raise VitslimError("--epochs must be 0 or more")
    rows = run_sweep(model, data, eval_data, list(budgets), out, references=tuple(references), calib_images=calib_images, eval_limit=eval_limit,
                     epochs=epochs, seed=seed, batch_size=batch_size, runs=runs)
    click.echo(render(["model", "top-1", "params", "throughput"], [[r["name"], percent(r["top1"]), human(r["params"]), f"{r['ratio']:.2f}x"] for r in rows]))
    click.echo(f"report: {Path(out) / 'report.md'}, plot: {Path(out) / 'pareto.png'}")


@cli.command("export")
@click.argument("model")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="The ONNX file to write (checked with ONNX Runtime).")
@click.option("--torch-export", "program_path", type=click.Path(dir_okay=False),
              help="A torch.export ExportedProgram (.pt2) to write (checked by loading it back).")
@click.option("--check-images", default=8, show_default=True, callback=_positive("--check-images"), help="Random images the file and PyTorch both run.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float, help="Largest absolute logit difference accepted.")
@click.option("--pretrained", is_flag=True, help="Load pretrained weights for a timm model name (needs the network).")
def export_command(model, onnx_path, program_path, check_images, tolerance, pretrained):
    """Export MODEL (any kind vitslim compresses) to ONNX and/or torch.export, and check each file.

    Each file takes preprocessed images of any batch size and returns the logits. It is kept
    only when its logits on seeded random images match PyTorch's within --tolerance.
    """
    import torch

    from vitslim.adapters import describe
    from vitslim.atomic import atomic_file
    from vitslim.export import export_onnx, export_program, onnx_max_abs_diff, program_max_abs_diff

    if onnx_path is None and program_path is None:
        raise VitslimError("say what to write: --onnx FILE and/or --torch-export FILE")
    loaded = _load(model, pretrained=pretrained)
    images = torch.randn(check_images, *describe(loaded).preprocessing.input_size, generator=torch.Generator().manual_seed(0))
    formats = [("ONNX Runtime", onnx_path, export_onnx, onnx_max_abs_diff), ("torch.export", program_path, export_program, program_max_abs_diff)]
    for name, path, write, compare in formats:
        if path is None:
            continue
        difference = float("nan")

        def export_and_check(unchecked: Path) -> None:
            nonlocal difference
            write(loaded, unchecked)
            difference = compare(loaded, unchecked, images)
            if not difference <= tolerance:
                raise VitslimError(f"{name}'s logits differ from PyTorch's by up to {difference:.3g}, above --tolerance {tolerance:g}; {path} was not written")

        atomic_file(Path(path), export_and_check)
        click.echo(f"wrote {path}; {name} vs PyTorch on {check_images} images: max abs difference {difference:.3g} (tolerance {tolerance:g})")


MERGE_NAMES = {"atme": "ATME", "tome": "ToMe"}


def _span(values) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _step_summary(step: dict) -> str:
    """One line on a recipe step, for people: what was changed and what was chosen or measured."""
    method = step.get("method")
    if method == "lowrank":
        ranks = step.get("ranks", {}).values()
        return (f"{step.get('factorisation', '')} low-rank, {len(ranks)} layers at ranks {_span(ranks) if ranks else '-'}"
                f"{', compensated' if step.get('compensation') else ''}, target {step.get('target_params', 0):,} params")
    if method == "channels":
        widths = step.get("blocks", {}).values()
        heads = [w["head_dim"] for w in widths if "head_dim" in w]
        hidden = [w["mlp_hidden"] for w in widths if "mlp_hidden" in w]
        return (f"{'consistent' if step.get('consistent', True) else 'per-head'} channel pruning: head dim {_span(heads) if heads else 'kept'}, "
                f"MLP hidden {_span(hidden) if hidden else 'kept'}")
    if method == "merging":
        schedule = step.get("schedule", {})
        steps = schedule.get("steps", [])
        measured = step.get("measured_speedup")
        return (f"{MERGE_NAMES.get(schedule.get('method'), schedule.get('method'))} token merging: {sum(r for _, r, _ in steps)} tokens after blocks "
                f"{', '.join(str(b) for b, _, _ in steps)}" + (f", concentration {step['concentration']:g}" if "concentration" in step else "")
                + (f", measured {measured:.2f}x" if measured else ""))
    if method == "int8":
        return f"int8 weights ({len(step.get('modules', []))} layers)"
    if method == "composed":
        return "composed split: " + ", ".join(f"{axis} {level:g}" for axis, level in step.get("levels", {}).items())
    return str(method)


@cli.command("info")
@click.argument("model")
def info_command(model):
    """What vitslim sees in MODEL: family, blocks, attention layout, tokens, preprocessing, and
    for a vitslim folder what its recipe changed."""
    from vitslim.adapters import describe
    from vitslim.metrics import count_params
    from vitslim.persist import STEPS_ATTR

    loaded = _load(model)
    spec = describe(loaded)
    attn = spec.blocks[0].attention
    steps = [["compression step", _step_summary(step)] for step in getattr(loaded, STEPS_ATTR, [])]
    click.echo(render(["property", "value"], [
        ["family", spec.family], ["blocks", str(len(spec.blocks))], ["embed dim", str(spec.embed_dim)],
        ["heads x head dim", f"{attn.num_heads} x {attn.head_dim}"], ["attention layout", attn.layout],
        ["prefix tokens", ", ".join(f"{k} {v}" for k, v in spec.prefix_kinds.items()) or "0"],
        ["patch grid", f"{spec.grid_size[0]} x {spec.grid_size[1]} (patch {spec.patch_size[0]})"],
        ["classes", str(spec.num_classes)], ["params", human(count_params(spec.model))],
        ["compressible linears", str(len(spec.linears()))],
        ["input", "x".join(map(str, spec.preprocessing.input_size)) + f", {spec.preprocessing.interpolation}, crop {spec.preprocessing.crop_pct:g}"],
        *steps,
    ]))


@cli.command("demo")
@click.option("--out", default="vitslim-demo", show_default=True, help="Folder for the report, plot and models.")
@click.option("--retrain", is_flag=True, help="Train the demo model again instead of using the cached one.")
def demo_command(out, retrain):
    """Everything vitslim does, end to end, on an embedded real-image default (no network, no data)."""
    from vitslim.demo import run_demo

    run_demo(Path(out), retrain=retrain)


def main(argv: list[str] | None = None) -> int:
    from vitslim import distributed

    clean = False
    try:
        cli.main(args=argv, prog_name="vitslim", standalone_mode=False)
        clean = True
    except VitslimError as error:
        click.echo(f"vitslim: error: {error}", err=True)
        return 2
    except click.UsageError as error:
        command = f"vitslim {error.ctx.info_name} --help" if error.ctx and error.ctx.parent else "vitslim --help"
        click.echo(f"vitslim: error: {error.format_message()} (see '{command}')", err=True)
        return error.exit_code
    except click.ClickException as error:
        click.echo(f"vitslim: error: {error.format_message()}", err=True)
        return error.exit_code
    except click.exceptions.Abort:
        click.echo("vitslim: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("vitslim: interrupted", err=True)
        return 130
    finally:
        distributed.shutdown(clean=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
