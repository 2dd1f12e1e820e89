"""``vitslim sweep``: compress one model over a grid of methods and budgets, measure every point
against the original in one process, and draw the trade-off.

Each point is compressed from the original, saved under ``OUT/models/``, and scored on the
held-out images as soon as it is made; its row lands in ``OUT/points.json`` at once, so a sweep
that stops resumes with the points it has not finished. Speed is measured last, for every point,
the original and any reference models together in one interleaved run, because ratios from
different runs do not compare on a shared machine. ``report.md`` and ``pareto.png`` come from
``points.json``: top-1 against parameters and against measured throughput, one curve per method.

Budgets: lowrank/svd/asvd keep a fraction of the parameters; cait/tome take a speed-up planned
by the FLOPs model; lowrank+cait takes a FLOPs reduction factor S (at most 1/S of the FLOPs)
with an optional parameter cap (``S@R``), split across channels, low-rank and tokens by
``compose.compress_composed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click
from torch import nn

from vitslim.atomic import atomic_file
from vitslim.errors import VitslimError
from vitslim.table import human, percent, render

PARAMETER_METHODS = {"lowrank": "whitened", "svd": "svd", "asvd": "asvd"}  # budget: fraction of the parameters kept
SPEED_METHODS = {"cait": "atme", "tome": "tome"}  # budget: target speed-up
COMPOSED = "lowrank+cait"  # budget: FLOPs reduction factor S (FLOPs ratio 1/S), optionally "@R" for a cap on the parameters kept
METHODS = [*PARAMETER_METHODS, *SPEED_METHODS, COMPOSED]


@dataclass(frozen=True)
class Point:
    method: str
    budget: float
    param_ratio: float | None = None  # lowrank+cait only: the parameter cap that goes with its FLOPs factor

    @property
    def name(self) -> str:
        cap = "" if self.param_ratio is None else f"@{self.param_ratio:g}"
        return f"{self.method}-{self.budget:g}{cap}"


def _number(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise VitslimError(f"--budgets {spec!r}: {text!r} is not a number") from None


def parse_budgets(specs: list[str]) -> list[Point]:
    """``["lowrank=0.5,0.3", "cait=1.5", "lowrank+cait=2@0.5"]`` → points, checking each method's
    budget range."""
    points = []
    for spec in specs:
        method, sep, values = spec.partition("=")
        if not sep or not values:
            raise VitslimError(f"--budgets takes METHOD=V[,V...] (e.g. lowrank=0.5,0.3, cait=1.5,2 or lowrank+cait=2@0.5), got {spec!r}")
        if method not in METHODS:
            raise VitslimError(f"unknown sweep method {method!r}; choose from {', '.join(METHODS)}")
        for text in values.split(","):
            speed, cap, ratio = text.partition("@")
            if cap and method != COMPOSED:
                raise VitslimError(f"--budgets {spec!r}: only {COMPOSED} takes a parameter cap (S@R)")
            budget = _number(spec, speed)
            param_ratio = _number(spec, ratio) if cap else None
            if method in PARAMETER_METHODS and not 0 < budget < 1:
                raise VitslimError(f"{method} budgets are fractions of the parameters kept (0 < R < 1), got {budget:g}")
            if method in SPEED_METHODS and not budget > 1:
                raise VitslimError(f"{method} budgets are speed-ups (greater than 1), got {budget:g}")
            if method == COMPOSED and not budget > 1:
                raise VitslimError(f"{method} budgets are FLOPs reduction factors (greater than 1; 2 keeps half the FLOPs), got {budget:g}")
            if param_ratio is not None and not 0 < param_ratio < 1:
                raise VitslimError(f"{COMPOSED} parameter caps are fractions of the parameters kept (0 < R < 1), got {param_ratio:g}")
            points.append(Point(method, budget, param_ratio))
    if not points:
        raise VitslimError("give at least one --budgets METHOD=V[,V...]")
    if len(set(points)) != len(points):
        raise VitslimError("a point appears twice in --budgets")
    return points


def _write_json(path: Path, rows: list[dict]) -> None:
    atomic_file(path, lambda partial: partial.write_text(json.dumps(rows, indent=1)))


def _compress(original: nn.Module, point: Point, calibration: list, train, epochs: int, seed: int) -> nn.Module:
    from vitslim.cait.compress import compress_cait
    from vitslim.compose import compress_composed
    from vitslim.lowrank.compress import compress_lowrank
    from vitslim.train import distill

    # speed points are planned by FLOPs (cait: its schedule's predicted speed-up; lowrank+cait: a
    # FLOPs ratio of 1/S): timing inside the sweep would let the load of the moment shape the
    # plan; the final run measures them all together
    if point.method == COMPOSED:
        return compress_composed(original, calibration, train if epochs else None, flops_ratio=1 / point.budget, param_ratio=point.param_ratio,
                                 epochs=epochs, finetune_epochs=epochs, seed=seed, progress=False)
    if point.method in PARAMETER_METHODS:
        compressed = compress_lowrank(original, calibration, param_ratio=point.budget, method=PARAMETER_METHODS[point.method], progress=False)
        if epochs:
            distill(compressed, original, train, epochs=epochs, seed=seed)
        return compressed
    # training-free, the calibration images still choose the schedule's shape (as the CLI's --data does)
    return compress_cait(original, train if epochs else calibration, speedup=point.budget, epochs=epochs, merge=SPEED_METHODS[point.method],
                         seed=seed, measure=False, progress=False)


def _kd_epochs(compressed: nn.Module, point: Point, epochs: int) -> int:
    """Epochs of distillation a point received: a composed point that pruned channels trained
    their gates for ``epochs`` and then distilled the whole for ``epochs`` more."""
    if point.method != COMPOSED:
        return epochs
    pruned = any(step["method"] == "channels" for step in compressed.vitslim_steps)
    return 2 * epochs if pruned else epochs


def run_sweep(model: str, data: str, eval_data: str, budgets: list[str], out: str | os.PathLike, *, references: tuple[str, ...] = (),
              calib_images: int = 256, eval_limit: int | None = None, epochs: int = 0, seed: int = 0, batch_size: int = 32,
              runs: int = 20) -> list[dict]:
    """Run (or resume) the sweep in ``out`` and return its rows, the original's first."""
    from vitslim import data as imagedata
    from vitslim.adapters import describe
    from vitslim.bench import benchmark, check_runs
    from vitslim.evaluate import evaluate
    from vitslim.loading import load_model
    from vitslim.persist import save

    points = parse_budgets(list(budgets))
    check_runs(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitslimError(f"{out} is a file; give a folder for the sweep")
    original = load_model(model)
    spec = describe(original)
    train = imagedata.open_images(data, imagedata.build_transform(spec.preprocessing), class_names=spec.label_names, labels_required=False)
    if len(train) < calib_images:
        raise VitslimError(f"{data} holds {len(train)} images, fewer than --calib-images {calib_images}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "points.json"
    rows: list[dict] = json.loads(log.read_text()) if log.is_file() else []
    calibration = [images for images, _, _ in imagedata.make_loader(imagedata.select(train, limit=calib_images, seed=seed), batch_size)]

    def score(name: str, kind: str, candidate: nn.Module, **extra) -> None:
        result = evaluate(candidate, eval_data, teacher=original, limit=eval_limit, seed=seed, labels_required=True, progress=False)
        rows[:] = [r for r in rows if r["name"] != name] + [{"name": name, "kind": kind, **extra, **result}]
        _write_json(log, rows)

    done = {r["name"] for r in rows if r["kind"] != "point" or (out / r["folder"]).is_dir()}
    if "original" not in done:
        score("original", "original", original)
    for reference in references:
        if f"reference {reference}" not in done:
            score(f"reference {reference}", "reference", load_model(reference), spec=reference)
    for index, point in enumerate(points, 1):
        if point.name in done:
            click.echo(f"[{index}/{len(points)}] {point.name}: already measured")
            continue
        click.echo(f"[{index}/{len(points)}] {point.name}: compressing, then scoring on the held-out images")
        compressed = _compress(original, point, calibration, train, epochs, seed)
        folder = save(compressed, out / "models" / point.name)
        score(point.name, "point", compressed, method=point.method, budget=point.budget, param_ratio=point.param_ratio,
              kd_epochs=_kd_epochs(compressed, point, epochs), folder=str(folder.relative_to(out)))

    wanted = {"original", *(f"reference {r}" for r in references), *(p.name for p in points)}
    timed = [r for r in rows if r["name"] in wanted]
    timed.sort(key=lambda r: (r["kind"] != "original", r["kind"] != "reference", r.get("method", ""), r.get("budget", 0)))
    click.echo(f"timing {len(timed)} models in one interleaved run (batch {batch_size}, median of {runs})")
    loaded = {"original": original, **{r["name"]: load_model(r["spec"]) for r in timed if r["kind"] == "reference"},
              **{r["name"]: load_model(str(out / r["folder"])) for r in timed if r["kind"] == "point"}}
    speeds = benchmark([(r["name"], loaded[r["name"]]) for r in timed], batch_size=batch_size, runs=runs, progress=False)
    for row, speed in zip(timed, speeds):
        row.update(ratio=speed.ratio, images_per_s=speed.images_per_s, device=speed.device, threads=speed.threads)
    _write_json(log, rows)
    _plot(timed, out / "pareto.png")
    atomic_file(out / "report.md", lambda partial: partial.write_text(_report(timed, speeds[0], eval_data)))
    return timed


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_speed) = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = sorted({r["method"] for r in rows if r["kind"] == "point"})
    for method in methods:
        curve = sorted((r for r in rows if r.get("method") == method), key=lambda r: r["params"])
        by_size.plot([r["params"] / 1e6 for r in curve], [100 * r["top1"] for r in curve], marker="o", label=method)
        curve.sort(key=lambda r: r["ratio"])
        by_speed.plot([r["ratio"] for r in curve], [100 * r["top1"] for r in curve], marker="o", label=method)
    for row in rows:
        if row["kind"] == "point":
            continue
        style = {"marker": "*", "s": 160, "color": "black"} if row["kind"] == "original" else {"marker": "D", "s": 60, "color": "gray"}
        by_size.scatter(row["params"] / 1e6, 100 * row["top1"], label=row["name"], **style)
        by_speed.scatter(row["ratio"], 100 * row["top1"], label=row["name"], **style)
    by_size.set(xlabel="parameters (millions)", ylabel="held-out top-1 (%)", title="accuracy against size")
    by_speed.set(xlabel="throughput, times the original's (one run)", ylabel="held-out top-1 (%)", title="accuracy against measured speed")
    for axis in (by_size, by_speed):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_file(path, lambda partial: figure.savefig(partial, dpi=120))
    plt.close(figure)


def _report(rows: list[dict], first, eval_data: str) -> str:
    table = render(["model", "KD epochs", "top-1", "agreement", "params", "FLOPs / image", "throughput ratio", "images/s"],
                   [[r["name"], str(r.get("kd_epochs", 0)), percent(r["top1"]), percent(r["agreement"]), f"{r['params']:,}", human(r["flops"]),
                     f"{r['ratio']:.2f}x", f"{r['images_per_s']:.1f}"] for r in rows], markdown=True)
    return (
        "# vitslim sweep\n\n"
        f"Held-out images: `{eval_data}` ({rows[0]['images']} scored). Agreement is top-1 agreement with the original.\n"
        f"Speed: {first.device}, {first.threads} threads, batch {first.batch_size}, {first.dtype}, median of {first.runs} "
        "interleaved runs; ratios are to the original in the same run.\n\n"
        f"{table}\n\n![trade-off](pareto.png)\n"
    )
