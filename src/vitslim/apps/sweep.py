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
``compose.compress_composed``. Each method says how it reads its budgets (``Method.sweep``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click
from torch import nn

from vitslim._infra.atomic import atomic_file
from vitslim._infra.table import human, percent, render
from vitslim.errors import ParameterError, VitslimError


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
        raise ParameterError("budgets", f"has {spec!r}, in which {text!r} is not a number") from None


def parse_budgets(budgets: list[str]) -> list[Point]:
    """``["lowrank=0.5,0.3", "cait=1.5", "lowrank+cait=2@0.5"]`` → points, checking each budget
    as its method reads it (``vitslim.methods.SweepBudget``)."""
    from vitslim.methods import sweep_budgets

    known = sweep_budgets()
    points = []
    for spec in budgets:
        method, sep, values = spec.partition("=")
        if not sep or not values:
            raise ParameterError("budgets", f"take the form METHOD=V[,V...] (e.g. lowrank=0.5,0.3, cait=1.5,2 or lowrank+cait=2@0.5), not {spec!r}")
        if method not in known:
            raise ParameterError("budgets", f"name method {method!r}, which has no sweep budget; choose from {', '.join(known)}")
        budget_kind = known[method][1]
        for text in values.split(","):
            speed, cap, ratio = text.partition("@")
            if cap and not budget_kind.cap:
                capped = [name for name, (_, other) in known.items() if other.cap]
                raise ParameterError("budgets", f"has {spec!r}, but only {', '.join(capped)} {'takes' if len(capped) == 1 else 'take'} a parameter cap (S@R)")
            budget = _number(spec, speed)
            param_ratio = _number(spec, ratio) if cap else None
            if not budget_kind.valid(budget):
                raise VitslimError(f"{method} budgets are {budget_kind.meaning}, got {budget:g}")
            if param_ratio is not None and not 0 < param_ratio < 1:
                raise VitslimError(f"{method} parameter caps are fractions of the parameters kept (0 < R < 1), got {param_ratio:g}")
            points.append(Point(method, budget, param_ratio))
    if not points:
        raise ParameterError("budgets", "must hold at least one METHOD=V[,V...]")
    if len(set(points)) != len(points):
        raise ParameterError("budgets", "name a point twice")
    return points


def _write_json(path: Path, rows: list[dict]) -> None:
    atomic_file(path, lambda partial: partial.write_text(json.dumps(rows, indent=1)))


def _compress(original: nn.Module, point: Point, train, calib_images: int, batch_size: int, epochs: int, seed: int) -> nn.Module:
    """One point through the pipeline; ``epochs`` is every training run of the method's own (its
    ``Training`` settings: CDCP's gates) and, where its sweep budget says, the recovery's."""
    from vitslim.methods import sweep_budgets
    from vitslim.pipeline import compress
    from vitslim.train import Training

    method, budget_kind = sweep_budgets()[point.method]
    options = budget_kind.options(point.budget, point.param_ratio)
    training = Training(epochs=epochs, batch_size=batch_size, seed=seed, progress=False) if epochs else None
    if training is not None:
        options.update({setting.name: training for setting in _trainings(method)})
    return compress(original, method(**options), train, calib_images=calib_images, calib_batch_size=batch_size, seed=seed,
                    recovery=training if budget_kind.recovery else None, progress=False)


def _kd_epochs(compressed: nn.Module, point: Point, epochs: int) -> int:
    """Epochs of distillation a point received: its method's own training (CDCP's gates, which
    run only when channels are pruned) and recovery count ``epochs`` each."""
    from vitslim.io.recipe import find_step
    from vitslim.methods import sweep_budgets

    method, budget_kind = sweep_budgets()[point.method]
    gates = bool(_trainings(method)) and find_step(compressed, "channels") is not None
    return epochs * (int(gates) + int(budget_kind.recovery))


def _trainings(method) -> list:
    """The method's ``Training`` settings."""
    from vitslim.train import Training

    return [setting for setting in method.settings() if setting.kind is Training]


def run_sweep(model: str, data: str, eval_data: str, budgets: list[str], out: str | os.PathLike, *, references: tuple[str, ...] = (),
              calib_images: int = 256, eval_limit: int | None = None, epochs: int = 0, seed: int = 0, batch_size: int = 32,
              runs: int = 20) -> list[dict]:
    """Run (or resume) the sweep in ``out`` and return its rows, the original's first."""
    from vitslim.adapters import describe
    from vitslim.io import image_dataset, image_sources
    from vitslim.io.loading import load_model
    from vitslim.io.persist import save
    from vitslim.measure.bench import benchmark, check_runs, noise_warning
    from vitslim.measure.evaluate import evaluate

    points = parse_budgets(list(budgets))
    check_runs(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitslimError(f"{out} is a file; give a folder for the sweep")
    original = load_model(model)
    spec = describe(original)
    train = image_sources.open_images(data, image_dataset.build_transform(spec.preprocessing), class_names=spec.label_names, labels_required=False)
    if len(train) < calib_images:
        raise ParameterError("calib_images", f"is {calib_images}, more than the {len(train)} images {data} holds")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "points.json"
    rows: list[dict] = json.loads(log.read_text()) if log.is_file() else []

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
        compressed = _compress(original, point, train, calib_images, batch_size, epochs, seed)
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
        row.update(ratio=speed.ratio, ratio_spread=round(speed.ratio_spread, 4), images_per_s=speed.images_per_s, device=speed.device,
                   threads=speed.threads)
    warning = noise_warning(speeds)
    if warning:
        click.echo(f"warning: {warning}", err=True)
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
