"""The ``vitslim`` command line."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import click

from vitslim._infra.table import human, percent, render
from vitslim.deploy.export import INT8_TOLERANCE, ONNX_TOLERANCE
from vitslim.errors import ParameterError, VitslimError

DISTRIBUTED_COMMANDS = {"compress", "eval"}  # the others time models or write many files: one process


def _load(spec: str, pretrained: bool = False):
    from vitslim.io.loading import load_model

    return load_model(spec, pretrained=pretrained)


def _positive(name: str):
    def check(ctx, param, value):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}", param_hint=name)
        return value

    return check


def _device(ctx, param, value):
    """``--device`` checked against this torch build as the command line is read, before any model loads."""
    from vitslim._infra.devices import check_device

    try:
        check_device(value)
    except ParameterError as error:
        raise error.named("--device") from None
    return value


def _tolerance(name: str):
    """A tolerance must be a finite number above 0, checked while parsing: before any export ran."""
    def check(ctx, param, value):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise click.BadParameter(f"must be a finite number above 0, got {value}", param_hint=name)
        return value

    return check


class Command(click.Command):
    """Every vitslim command. The library names a bad value by its Python parameter
    (``ParameterError``); a command re-words it with its own flag for that parameter."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ParameterError as error:
            flags = {}
            for param in self.get_params(ctx):
                if isinstance(param, click.Option):  # by the Python name click gives it, and by its flag's own words
                    flag = max(param.opts, key=len)
                    flags |= {param.name: flag, flag.lstrip("-").replace("-", "_"): flag}
            if error.parameter not in flags:
                raise
            raise VitslimError(f"{flags[error.parameter]} {error.problem}") from None


class Group(click.Group):
    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitslim")
@click.option("-v", "--verbose", is_flag=True, help="Log what vitslim does (to stderr).")
def cli(verbose: bool) -> None:
    """Compress pretrained Vision Transformers and measure the result.

    MODEL is a timm model name (random init unless --pretrained), a timm folder
    (local-dir:PATH or PATH with config.json + model.safetensors), a Hugging Face ViT folder,
    or a folder written by vitslim.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("vitslim._infra.progress").setLevel(logging.INFO)  # long work says where it is, -v or not (vitslim._infra.progress)
    from vitslim._infra import distributed

    distributed.init_from_environment()
    if distributed.active():
        command = click.get_current_context().invoked_subcommand
        if command not in DISTRIBUTED_COMMANDS:
            raise VitslimError(f"vitslim {command} runs in one process; launch it without torchrun "
                               f"(under torchrun: {', '.join(sorted(DISTRIBUTED_COMMANDS))})")
        if not distributed.is_main():  # one report, from rank 0; errors still reach stderr
            sys.stdout = open(os.devnull, "w")


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, help="ImageFolder directory, a zip of one, or a CSV (file,label) beside its images; "
                                             "with --teacher also a plain folder of unlabelled images (agreement and KL only).")
@click.option("--limit", type=int, callback=_positive("--limit"), help="Evaluate a seeded random subset of N images.")
@click.option("--skip", type=int, default=0, show_default=True, help="Leave out the first N images of the seeded order (e.g. those used for calibration).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset order.")
@click.option("--teacher", help="Reference model: adds top-1 agreement and mean KL (no labels needed); for a model whose output "
                                "is a map or features, the fidelity of its outputs (MAE, Pearson r, IoU).")
@click.option("--threshold", type=float, default=0.8, show_default=True,
              help="Maps and features: the level at which both outputs are thresholded for the IoU.")
@click.option("--batch-size", type=int, default=64, show_default=True, callback=_positive("--batch-size"))
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--pretrained", is_flag=True, help="Download pretrained weights for a timm name (needs a reachable hub).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def eval_command(model, data, limit, skip, seed, teacher, threshold, batch_size, workers, device, pretrained, as_json):
    """Accuracy, parameters and FLOPs of MODEL on labelled images (with --teacher: agreement and KL, on any images;
    for a feature extractor, fidelity to the teacher's features)."""
    from vitslim.io.folder_io import WEIGHTS_FILE
    from vitslim.measure.evaluate import evaluate
    from vitslim.measure.metrics import folder_bytes

    student = _load(model, pretrained)
    reference = _load(teacher, pretrained) if teacher else None
    result = evaluate(student, data, teacher=reference, limit=limit, skip=skip, seed=seed, batch_size=batch_size, workers=workers,
                      device=device, threshold=threshold)
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
    if "pearson" in result:
        rows += [["MAE", f"{result['mae']:.4g}"], ["Pearson r (mean per image)", f"{result['pearson']:.4f}"],
                 ["cosine (mean per image)", f"{result['cosine']:.4f}"], [f"IoU@{result['threshold']:g}", f"{result['iou']:.4f}"]]
    if "bytes" in result:
        rows.append(["bytes on disk", human(result["bytes"]) + "B"])
    click.echo(render(["metric", model], rows))


@cli.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive("--batch-size"))
@click.option("--threads", type=int, callback=_positive("--threads"), help="torch intra-op threads, and ONNX Runtime's (default: torch's choice).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, callback=_device)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--runtime", "runtimes", type=click.Choice(["eager", "compile", "onnxruntime"]), multiple=True, default=["eager"],
              show_default=True, help="Where to time the models: eager PyTorch, torch.compile, or ONNX Runtime (each model exported, "
                                      "cached and checked against PyTorch first). Repeat it to time several in one interleaved run; "
                                      "ratios compare models within one runtime. With onnxruntime alone, a MODEL may be an .onnx file.")
@click.option("--onnx-cache", type=click.Path(file_okay=False), help="Folder for the exported ONNX files, reused by later runs "
                                                                     "[default: ~/.cache/vitslim/onnx, or $VITSLIM_CACHE/onnx].")
@click.option("--onnx-tolerance", type=float, default=1e-3, show_default=True, callback=_tolerance("--onnx-tolerance"),
              help="Largest absolute output difference from PyTorch an exported model may show before it is timed.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed rounds per model (at least 20).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds first (with --runtime compile, they compile).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list, one object per model and runtime.")
def bench_command(models, batch_size, threads, device, dtype, runtimes, onnx_cache, onnx_tolerance, runs, warmup, as_json):
    """Throughput, latency and memory of MODELS, interleaved in one process; ratios are to the first, in each runtime."""
    from vitslim.measure.bench import benchmark, noise_warning, ratio_text

    loaded = [(spec, Path(spec) if spec.endswith(".onnx") else _load(spec)) for spec in models]
    results = benchmark(loaded, batch_size=batch_size, threads=threads, device=device, dtype=dtype, runs=runs, warmup=warmup,
                        runtime=runtimes, onnx_cache=onnx_cache, onnx_tolerance=onnx_tolerance)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
        return
    first = results[0]
    click.echo(f"device {first.device}, {first.threads} threads, batch {first.batch_size}, {first.dtype}, median of {first.runs} interleaved runs")
    rows = [[r.model, r.runtime, f"{r.images_per_s:.1f}", ratio_text(r), f"{r.latency_ms:.1f}",
             "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}", human(r.params), "-" if r.flops is None else human(r.flops)]
            for r in results]
    click.echo(render(["model", "runtime", "images/s", "ratio", "latency ms", "peak MB", "params", "FLOPs/img"], rows))
    warning = noise_warning(results)
    if warning:
        click.echo(f"warning: {warning}", err=True)


SHARED_TRAINING_FLAGS = {"Training.lr": "--lr", "Training.batch_size": "--batch-size", "Training.checkpoints": "--checkpoints",
                         "Training.resume": "--resume"}


def _method_in(args: list[str]) -> str | None:
    """The ``--method`` value among raw arguments, read before click parses them (for ``--help``)."""
    for index, arg in enumerate(args):
        if arg == "--method" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--method="):
            return arg.partition("=")[2]
    return None


def _setting_option(setting) -> click.Option:
    """The click option of one method setting, generated from its kind: a bool is a flag pair, a
    ``Training`` its epoch count, a ``Literal`` a choice. Its default stays None (not given), so
    that only what the user typed reaches the config, whose own default applies otherwise."""
    from vitslim.train import Training

    shown = "" if setting.default is None or setting.kind is Training else f" [default: {setting.default}]"
    if setting.kind is bool:
        off = setting.off or "--no-" + setting.cli_flag.removeprefix("--")
        shown = "" if setting.default is None else f" [default: {setting.cli_flag if setting.default else off}]"
        return click.Option([f"{setting.cli_flag}/{off}", setting.name], default=None, help=setting.help + shown)
    if setting.kind is Training:
        return click.Option([setting.cli_flag, setting.name], type=click.IntRange(min=0), help=setting.help)
    kind = click.Choice(setting.choices) if setting.choices else setting.kind
    return click.Option([setting.cli_flag, setting.name], type=kind, help=setting.help + shown)


def _method_options() -> dict[str, click.Option]:
    """One click option per setting name, across every registered method (a name means one
    thing, of one kind, in every method that has it)."""
    from vitslim.methods import methods

    made: dict[str, click.Option] = {}
    kinds: dict[str, type] = {}
    for method in methods():
        for setting in method.settings():
            if not setting.cli:
                continue
            if setting.name in kinds and kinds[setting.name] is not setting.kind:
                raise TypeError(f"setting {setting.name!r} of --method {method.name} is a {setting.kind.__name__}, "
                                f"elsewhere a {kinds[setting.name].__name__}")
            kinds[setting.name] = setting.kind
            made.setdefault(setting.name, _setting_option(setting))
    return made


class CompressCommand(Command):
    """``compress`` with each method's own options: ``--help`` lists the shared options and, for
    ``--method M``, only M's (without it, each method's in a section of its own)."""

    def get_params(self, ctx):
        """The shared options, then every registered method's (read now, so a method registered
        after this module was imported has its options too)."""
        shared = super().get_params(ctx)
        return [*shared[:-1], *_method_options().values(), shared[-1]]  # --help stays last

    def parse_args(self, ctx, args):
        ctx.meta["vitslim_method"] = _method_in(args)
        return super().parse_args(ctx, args)

    def format_options(self, ctx, formatter):
        from vitslim.methods import method_names, methods

        method_settings = set(_method_options())
        shared = [p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option) and p.name not in method_settings and not p.hidden]
        with formatter.section("Options for every method"):
            formatter.write_dl([record for record in shared if record])
        chosen = ctx.meta.get("vitslim_method")
        for method in methods():
            if chosen in method_names() and method.name != chosen:
                continue
            with formatter.section(f"--method {method.name} ({method.summary})"):
                formatter.write_dl([_setting_option(setting).get_help_record(ctx) for setting in method.settings() if setting.cli])


def _training(epochs: int, flag: str, *, lr, batch_size, seed, device, checkpoints, resume, folder: str):
    """A ``Training`` from the shared flags, its errors said in flags."""
    from vitslim.train import Training

    try:
        return Training(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device, checkpoints=checkpoints,
                        resume=resume).within(folder)
    except ParameterError as error:
        raise _in_flags(error, {"Training.epochs": flag}) from None


def _in_flags(error, flags: dict[str, str]) -> VitslimError:
    """A library ``ParameterError`` re-worded with the CLI's flag names."""
    names = {**SHARED_TRAINING_FLAGS, **flags}
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)) + r")(?![\w])")
    return VitslimError(pattern.sub(lambda match: names[match.group(1)], str(error)))


@cli.command("compress", cls=CompressCommand)
@click.argument("model")
@click.option("--data", required=True, help="Training images (never the images you report on): class folders, a zip, a CSV, or a plain "
                                             "folder of unlabelled images (no method needs labels). Calibration, gate training and recovery read them.")
@click.option("--out", required=True, help="Output folder (model.safetensors + recipe.json + config.json).")
@click.option("--method", default="lowrank", show_default=True,
              help="The compression method (any registered: 'vitslim compress --help' lists them); "
                   "'vitslim compress MODEL --method M --help' lists M's options.")
@click.option("--like", help="Keep as many parameters as this timm model has (e.g. deit_small_patch16_224); methods with a parameter budget.")
@click.option("--calib-images", type=int, default=256, show_default=True, callback=_positive("--calib-images"), help="Calibration images, a seeded subset of --data.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration subset and of every training run.")
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive("--batch-size"), help="Batch of calibration and training.")
@click.option("--recovery-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Distil the original into the compressed model for E epochs over all of --data (knowledge-distillation recovery).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate of every training run (warm-up, then cosine).")
@click.option("--checkpoints", help="Folder for per-epoch training checkpoints (pickle-free): one sub-folder per training run "
                                    "(recovery/, and a method's own, e.g. gates/).")
@click.option("--resume", is_flag=True, help="Continue the training runs from the last checkpoints in --checkpoints.")
@click.option("--int8", type=click.Choice(["weight", "dynamic"]), is_flag=False, flag_value="weight", default=None,
              help="Finally quantise every Linear to int8 (per output channel), about 4x fewer bytes on disk: 'weight' (plain --int8) "
                   "stores int8 weights only, the smallest file, no faster; 'dynamic' also quantises activations at run time for "
                   "int8 matmuls, faster on CPU.")
@click.option("--device", default="cpu", show_default=True, callback=_device, help="Where calibration and training run (cuda: under torchrun, each rank's own GPU).")
@click.option("--objective", type=click.Choice(["auto", "logits", "map", "features"]), default="auto", show_default=True,
              help="What the result must preserve: logits (KL), map (per-pixel MSE), features (relative MSE); auto follows the model's output.")
@click.pass_context
def compress_command(ctx, model, data, out, method, like, calib_images, seed, batch_size, recovery_epochs, lr, checkpoints, resume, int8, device,
                     objective, **method_values):
    """Compress MODEL with one method to its budget (parameters, speed-up or FLOPs), optionally
    recover with distillation and quantise to int8, and save it to --out."""
    from vitslim.lowrank.compress import ParameterBudget
    from vitslim.measure.metrics import count_params
    from vitslim.methods import configure, get_method
    from vitslim.pipeline import compress_to_folder
    from vitslim.train import Training

    try:
        chosen = get_method(method)
    except ParameterError as error:
        raise VitslimError(f"--method {error.problem}") from None
    settings = {setting.name: setting for setting in chosen.settings() if setting.cli}
    flags = {name: setting.cli_flag for name, setting in settings.items()}
    given = {name for name in method_values if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    budgeted = issubclass(chosen, ParameterBudget)
    stray = sorted(given - set(settings))
    if stray or (like is not None and not budgeted):
        names = [_method_options()[name].opts[0] for name in stray] + (["--like"] if like is not None and not budgeted else [])
        raise VitslimError(f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not apply to --method {method}; "
                           f"see 'vitslim compress MODEL --method {method} --help'")
    options = {name: method_values[name] for name in given}
    if like is not None:
        if "params" in options or "param_ratio" in options:
            raise VitslimError("state the parameter budget once: --param-ratio, --params or --like")
        options["params"] = count_params(_load(like))
    shared = dict(lr=lr, batch_size=batch_size, seed=seed, device=device, checkpoints=checkpoints, resume=resume)
    if resume and not checkpoints:
        raise VitslimError("--resume needs --checkpoints, the folder the interrupted training wrote")
    trainings = [name for name in options if settings[name].kind is Training]
    if (checkpoints or resume) and not (recovery_epochs or any(options[name] for name in trainings)):
        runs = ["--recovery-epochs"] + [each.cli_flag for each in settings.values() if each.kind is Training]
        raise VitslimError(f"--checkpoints and --resume belong to training; give {' or '.join(runs)} too")
    for name in trainings:
        epochs = options.pop(name)
        if epochs:
            options[name] = _training(epochs, flags[name], folder=settings[name].folder or name, **shared)
    recovery = _training(recovery_epochs, "--recovery-epochs", folder="recovery", **shared) if recovery_epochs else None
    reworded = {**flags, "calib_images": "--calib-images", "Training.epochs": "--recovery-epochs"}
    try:
        config = configure(chosen, **options)
        _, compressed, folder = compress_to_folder(model, data, out, config, report=click.echo, calib_images=calib_images, calib_batch_size=batch_size,
                                                   seed=seed, device=device, recovery=recovery, int8=int8, objective=objective)
    except ParameterError as error:
        raise _in_flags(error, reworded) from None
    if int8 == "weight":
        click.echo("weights quantised to int8 (per output channel)")
    elif int8 == "dynamic":
        click.echo("weights quantised to int8 (per output channel), activations at run time (dynamic int8 matmuls)")
    click.echo(f"saved to {folder}")


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
    from vitslim.apps.sweep import run_sweep

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
@click.option("--tolerance", default=ONNX_TOLERANCE, show_default=True, type=float, callback=_tolerance("--tolerance"),
              help="Largest absolute logit difference accepted (float files).")
@click.option("--int8", type=click.Choice(["dynamic", "none"]),
              help="Quantise the ONNX file with ONNX Runtime's dynamic int8 (int8 weights per output channel, activations at run "
                   "time): int8 matmuls, faster on CPU. It is checked against --int8-tolerance instead of --tolerance. Default: "
                   "'dynamic' for a model holding dynamic int8 layers (compress --int8 dynamic, or planned by lowrank+cait), whose "
                   "int8 layers, and only those, become int8 MatMuls; 'none' otherwise.")
@click.option("--int8-tolerance", default=INT8_TOLERANCE, show_default=True, type=float, callback=_tolerance("--int8-tolerance"),
              help="Largest relative output error ||int8 - float|| / ||float|| on the check images accepted for an --int8 "
                   "file: a guard against a broken file, not an accuracy promise (see docs/export.md).")
@click.option("--pretrained", is_flag=True, help="Load pretrained weights for a timm model name (needs the network).")
def export_command(model, onnx_path, program_path, check_images, tolerance, int8, int8_tolerance, pretrained):
    """Export MODEL (any kind vitslim compresses) to ONNX and/or torch.export, and check each file.

    Each file takes preprocessed images of any batch size and returns the logits. It is kept
    only when its logits on seeded random images match PyTorch's within --tolerance. With
    --int8 dynamic the float ONNX graph is checked so first, then quantised, and the int8 file
    is kept only within --int8-tolerance (relative error; its top-1 agreement is reported).
    """
    import torch

    from vitslim._infra.atomic import atomic_file
    from vitslim.adapters import describe
    from vitslim.deploy.export import export_checked_onnx, export_program, program_max_abs_diff
    from vitslim.deploy.quantize import int8_layers

    if onnx_path is None and program_path is None:
        raise VitslimError("say what to write: --onnx FILE and/or --torch-export FILE")
    if int8 == "dynamic" and onnx_path is None:
        raise VitslimError(f"--int8 {int8} quantises the ONNX file; give --onnx FILE too")
    loaded = _load(model, pretrained=pretrained)
    if int8 is None and onnx_path is not None and "dynamic" in int8_layers(loaded).values():
        int8 = "dynamic"
        click.echo("the model holds dynamic int8 layers: writing them as int8 MatMuls (--int8 none writes float matmuls over their "
                   "dequantised weights)")
    int8 = None if int8 == "none" else int8
    images = torch.randn(check_images, *describe(loaded).preprocessing.input_size, generator=torch.Generator().manual_seed(0))
    if onnx_path is not None:
        written = export_checked_onnx(loaded, onnx_path, images, tolerance=tolerance, int8=int8, int8_tolerance=int8_tolerance)
        if written.int8 is None:
            click.echo(f"wrote {onnx_path}; ONNX Runtime vs PyTorch on {check_images} images: {written.float_check}")
        else:
            comparison = written.int8
            agreement = "" if comparison.top1_agreement is None else f", top-1 agreement {comparison.top1_agreement:.1%}"
            click.echo(f"wrote {onnx_path} (dynamic int8); ONNX Runtime vs PyTorch float on {check_images} images: relative error "
                       f"{comparison.relative_error:.3g} (tolerance {int8_tolerance:g}), max abs difference {comparison.max_abs_diff:.3g}"
                       f"{agreement}; the float graph before quantisation: {written.float_check}")
    if program_path is not None:
        difference = float("nan")

        def export_and_check(unchecked: Path) -> None:
            nonlocal difference
            export_program(loaded, unchecked)
            difference = program_max_abs_diff(loaded, unchecked, images)
            if not difference <= tolerance:
                raise VitslimError(f"torch.export's output differs from PyTorch's by up to {difference:.3g}, above --tolerance {tolerance:g}; "
                                   f"{program_path} was not written")

        atomic_file(Path(program_path), export_and_check)
        click.echo(f"wrote {program_path}; torch.export vs PyTorch on {check_images} images: max abs difference {difference:.3g} "
                   f"(tolerance {tolerance:g})")


@cli.command("info")
@click.argument("model")
def info_command(model):
    """What vitslim sees in MODEL: family, blocks, attention layout, tokens, preprocessing, and
    for a vitslim folder what its recipe changed."""
    from vitslim.adapters import describe
    from vitslim.io.recipe import steps, summarise
    from vitslim.measure.metrics import count_params

    loaded = _load(model)
    spec = describe(loaded)
    attn = spec.blocks[0].attention
    step_rows = [["compression step", summarise(step)] for step in steps(loaded)]
    click.echo(render(["property", "value"], [
        ["family", spec.family], ["blocks", str(len(spec.blocks))], ["embed dim", str(spec.embed_dim)],
        ["heads x head dim", f"{attn.num_heads} x {attn.head_dim}"], ["attention layout", attn.layout],
        ["prefix tokens", ", ".join(f"{k} {v}" for k, v in spec.prefix_kinds.items()) or "0"],
        ["patch grid", f"{spec.grid_size[0]} x {spec.grid_size[1]} (patch {spec.patch_size[0]})"],
        ["classes", str(spec.num_classes)], ["params", human(count_params(spec.model))],
        ["compressible linears", str(len(spec.linears()))],
        ["input", "x".join(map(str, spec.preprocessing.input_size)) + f", {spec.preprocessing.interpolation}, crop {spec.preprocessing.crop_pct:g}"],
        *step_rows,
    ]))


@cli.command("demo")
@click.option("--out", default="vitslim-demo", show_default=True, help="Folder for the report, plot and models.")
@click.option("--retrain", is_flag=True, help="Train the demo model again instead of using the cached one.")
def demo_command(out, retrain):
    """Everything vitslim does, end to end, on an embedded real-image default (no network, no data)."""
    from vitslim.apps.demo import run_demo

    run_demo(Path(out), retrain=retrain)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from vitslim._infra import distributed

    clean = False
    # SIGTERM (kill's default) exits through Python, as Ctrl-C does, so that an interrupted save
    # removes its staging folder and output claim (vitslim._infra.atomic) instead of leaving them behind
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
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
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
