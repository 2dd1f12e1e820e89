"""What the benchmark scripts share: paths, resumable rows, the machine header, tables and writers.

Every script in ``benchmarks/`` and ``benchmarks/studies/`` runs from the repository root
(``.venv/bin/python benchmarks/X.py``, ``.venv/bin/python benchmarks/studies/X.py``) and imports
this module as ``common``; a study puts ``benchmarks/`` on ``sys.path`` first. Importing it
imports vitslim, so a script that imports timm itself still gets vitslim's guard first
(``vitslim._compat``).

- Paths: ``ROOT`` (the checkout), ``SHARED`` (``../shared`` beside it), ``RESULTS``, and the
  reference model and CIFAR-10 splits every CIFAR benchmark defaults to.
- ``Rows``: a JSON list of result rows, loaded if the file exists, each new row tagged with
  ``machine()`` and the list rewritten atomically, so a long run resumes where it stopped.
- ``machine()`` / ``machine_line()``: device, CPU threads, torch/timm/vitslim versions and date,
  written into every results file (a ``"machine"`` key in JSON, a line in markdown).
- ``Column`` / ``markdown_table`` / ``write_table``: one table definition gives the markdown
  table, a CSV of the raw values, and a JSON document holding the rows and the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import vitslim
from vitslim._infra.atomic import atomic_file
from vitslim.adapters import describe
from vitslim.cait.merging import unmerge
from vitslim.cait.patch import token_map
from vitslim.cait.schedule import LEVELLED
from vitslim.io import image_dataset, image_sources
from vitslim.io.image_batches import make_loader, select

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE_MODEL = f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}"
CIFAR_TRAIN = str(SHARED / "data" / "cifar10-jpeg" / "train.zip")
CIFAR_TEST = str(SHARED / "data" / "cifar10-jpeg" / "test.zip")


# --- command line ---------------------------------------------------------------------------

def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_int8_tolerance(parser: argparse.ArgumentParser) -> None:
    """``--int8-tolerance`` for a benchmark that scores its int8 ONNX files itself: the export's
    guard on an int8 file's relative error to PyTorch's float output is loosened from the
    library's 0.2 to 0.5, so it only stops a broken file (low-rank 50% of dinov2-s14's classifier,
    quantised, measured 0.206) and the page reports what the file does."""
    parser.add_argument("--int8-tolerance", type=float, default=0.5,
                        help="the export's guard on an int8 file's relative error to PyTorch's float output (library default 0.2)")


def add_reference_arguments(parser: argparse.ArgumentParser, *, train: bool = True, test: bool = True) -> None:
    """``--model`` (the reference ViT), ``--train`` and ``--test`` (the CIFAR-10 JPEG zips)."""
    parser.add_argument("--model", default=REFERENCE_MODEL)
    if train:
        parser.add_argument("--train", default=CIFAR_TRAIN)
    if test:
        parser.add_argument("--test", default=CIFAR_TEST)


def shown(path: str | os.PathLike) -> str:
    """``path`` as a results file quotes it: relative to the checkout when inside it, ``../shared/…``
    for the shared folder (a ``local-dir:`` prefix kept), quoted for a shell where needed."""
    text = str(path)
    prefix = "local-dir:" if text.startswith("local-dir:") else ""
    resolved = Path(text.removeprefix(prefix)).resolve()
    if resolved.is_relative_to(ROOT):
        text = prefix + str(resolved.relative_to(ROOT))
    elif resolved.is_relative_to(SHARED.resolve()):
        text = prefix + str(Path("../shared") / resolved.relative_to(SHARED.resolve()))
    return shlex.quote(text)


def command(*arguments: object) -> str:
    """The command that reruns the calling script, as results files quote it: ``.venv/bin/python
    benchmarks/…py ARGUMENTS`` in backquotes (pass paths through ``shown``)."""
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "`" + " ".join([".venv/bin/python", str(script), *(str(a) for a in arguments)]) + "`"


def rerun(parser: argparse.ArgumentParser, args: argparse.Namespace, *, always: Sequence[str] = (), leave_out: Sequence[str] = ()) -> str:
    """``command`` for ``args``: every option whose value differs from its default, and those named
    in ``always`` (by dest) even when it does not; paths through ``shown``; hidden options and those
    in ``leave_out`` (say, a rewrite-only switch) left out."""
    arguments: list[object] = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in ("help", *leave_out):
            continue
        value = getattr(args, action.dest)
        if value == action.default and action.dest not in always:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            arguments += [flag] if value != action.default else []
            continue
        values = value if isinstance(value, list) else [value]
        arguments += [flag, *(shown(v) if isinstance(v, str) and os.sep in v else f"{v:g}" if isinstance(v, float) else v for v in values)]
    return command(*arguments)


# --- the machine header ---------------------------------------------------------------------

def cpu_name() -> str:
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Where and with what a figure was measured: device, CPU, cores, torch's CPU threads, the
    torch/timm/vitslim/Python versions, and the date (UTC)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": f"CPU ({cpu_name()})" + (f", GPU {gpu} present" if gpu else ""),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "timm": _version("timm"),
        "vitslim": vitslim.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict | None = None, *, resumed: bool = False) -> str:
    """``info`` (default: this process's ``machine()``) as one markdown line; ``resumed``: the file
    also holds rows from earlier runs, whose own machine is in the JSON."""
    info = info or machine()
    line = (f"Machine: {info['device']}, {info['cores']} cores, {info['threads']} torch threads; torch {info['torch']}, "
            f"timm {info['timm']}, vitslim {info['vitslim']}, Python {info['python']}; written {info['date']}.")
    if resumed:
        line += " Each row's own machine is in the JSON (`machine`; absent from rows measured before it was recorded)."
    return line


def heading(title: str, text: str, *, info: dict | None = None, resumed: bool = False) -> list[str]:
    """The top of a results page: its title, ``text`` (what was measured, how, the command) and
    the machine line (see ``machine_line``), each followed by a blank line."""
    return [f"# {title}", "", text, "", machine_line(info, resumed=resumed), ""]


# --- writing results --------------------------------------------------------------------------

def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path`` atomically (a half-written results file never replaces a whole one)."""
    return atomic_file(Path(path), lambda partial: partial.write_text(text))


def write_lines(path: str | os.PathLike, lines: Iterable[str], *, echo: bool = False) -> Path:
    """A markdown page, one line each, written atomically; ``echo`` prints it too."""
    text = "\n".join(lines) + "\n"
    if echo:
        print(text, end="", flush=True)
    return write_text(path, text)


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def write_csv(path: str | os.PathLike, keys: Sequence[str], rows: Iterable[dict]) -> Path:
    """The ``keys`` of every row as CSV columns (raw values; a missing or None value is empty)."""
    def fill(partial: Path) -> None:
        with partial.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(keys)
            for row in rows:
                writer.writerow(["" if row.get(key) is None else row[key] for key in keys])

    return atomic_file(Path(path), fill)


class Rows:
    """Result rows kept in a JSON list, for a benchmark that resumes: the file's rows are loaded
    if it exists; ``add`` tags a new row with ``machine()`` and rewrites the file atomically."""

    def __init__(self, path: str | os.PathLike, *, indent: int = 2):
        self.path = Path(path)
        self.indent = indent
        self.rows: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, **match: Any) -> dict | None:
        """The first row whose values equal every ``match`` (a key a row lacks counts as None)."""
        return next((row for row in self.rows if all(row.get(key) == value for key, value in match.items())), None)

    def has(self, **match: Any) -> bool:
        return self.find(**match) is not None

    def add(self, row: dict, *, save: bool = True) -> dict:
        """Append ``row`` tagged with this machine; ``save=False`` when more rows of one
        measurement follow (then ``save`` once, so the file never holds part of it)."""
        row = {**row, "machine": machine()}
        self.rows.append(row)
        if save:
            self.save()
        return row

    def update(self, row: dict, **values: Any) -> None:
        """Set ``values`` on a row already here (a measurement taken later, e.g. its timing) and
        re-tag it with this machine; ``save`` writes it."""
        row.update(values, machine=machine())

    def save(self) -> None:
        write_json(self.path, self.rows, indent=self.indent)


@dataclass(frozen=True)
class Column:
    """A table column: the row's ``key``, its markdown ``header``, and ``fmt``, how a value is shown
    there (a format string such as ``"{:.2%}"``, or a callable of the value); None shows as
    ``missing``. CSV and JSON keep the raw value under ``key``."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"
    missing: str = ""

    def show(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            return self.missing
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


def markdown_table(columns: Sequence[Column], rows: Iterable[dict]) -> list[str]:
    lines = ["| " + " | ".join(column.header for column in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(column.show(row) for column in columns) + " |" for row in rows]
    return lines


def write_table(markdown: str | os.PathLike, lines: Iterable[str], tables: dict[str, tuple[Sequence[Column], list[dict]]],
                *, echo: bool = False, **extra: Any) -> None:
    """A results page and its data, side by side: ``lines`` to ``markdown`` (``X.md``, printed too
    when ``echo``); a JSON document ``X.json`` with ``machine()``, ``extra`` and each table's rows
    under its name; and a CSV per table of its columns' keys, ``X.csv`` for the first,
    ``X-NAME.csv`` for the others."""
    markdown = Path(markdown)
    write_lines(markdown, lines, echo=echo)
    write_json(markdown.with_suffix(".json"), {"machine": machine(), **extra, **{name: rows for name, (_, rows) in tables.items()}})
    for index, (name, (columns, rows)) in enumerate(tables.items()):
        target = markdown.with_suffix(".csv") if index == 0 else markdown.with_name(f"{markdown.stem}-{name}.csv")
        write_csv(target, [column.key for column in columns], rows)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- images and models ------------------------------------------------------------------------

def open_split(spec, path: str, *, labelled: bool = True) -> image_dataset.ImageDataset:
    """The images at ``path`` through the model's own eval transform (``spec.preprocessing``),
    labelled with the model's class names when ``labelled``."""
    transform = image_dataset.build_transform(spec.preprocessing)
    return image_sources.open_images(path, transform, class_names=spec.label_names) if labelled else image_sources.open_images(path, transform)


def image_batches(images, limit: int | None, batch_size: int, *, seed: int = 0, labels: bool = False) -> list:
    """A seeded subset of ``limit`` images (``vitslim.io.image_batches.select``) in batches, the calibration
    sets the benchmarks draw: each batch's image tensor, or with ``labels`` the whole
    ``(images, labels, skipped)`` the loader gives."""
    loader = make_loader(select(images, limit=limit, seed=seed), batch_size)
    return list(loader) if labels else [batch for batch, _, _ in loader]


def steps_text(method: str, steps: Iterable[Sequence[int]]) -> str:
    """A merge schedule's steps as the tables show them: ``(block,r,level)`` for the kinds with
    sub-grid levels (the lattice reading, windows), ``(block,r)`` for ATME and ToMe (whose level
    means nothing)."""
    return " ".join(f"({b},{r},{level})" if method in LEVELLED else f"({b},{r})" for b, r, level in steps)


def logits_and_features(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on ``images`` and its last block's output per position, merged tokens
    copied back to every position they absorbed (``unmerge``), so a merged model's features line
    up with the original's."""
    seen = []
    handle = describe(model).blocks[-1].module.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        handle.remove()
    mapping = token_map(model)
    return logits, unmerge(seen[0], mapping) if mapping is not None else seen[0]
