"""A compressed model's recipe: the structural steps applied to it, in order, and how each rebuilds.

Every method that changes a model's structure (factorised layers, pruned channels, a merge
schedule, int8 weights) appends one step, a JSON-able dict whose ``"method"`` names it, and
registers two functions under that name: one that re-applies the change to a freshly built model
(``vitslim.save`` writes the steps; loading replays them before the weights are loaded) and one
that summarises it in a line for people (``vitslim info``). The steps travel with the model as a
plain attribute; read and change them only through the functions here.

A step name read from a recipe file only ever selects one of the registered functions; nothing
named in a file is imported. The functions are registered when the modules defining them are
imported, which ``import vitslim`` does (and so does any import of a vitslim module, first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitslim.errors import VitslimError

STEPS_ATTR = "vitslim_steps"


@dataclass(frozen=True)
class StepKind:
    """How one kind of step rebuilds on load and reads in a summary."""

    rebuild: Callable[[nn.Module, dict], None]
    summarise: Callable[[dict], str]


_KINDS: dict[str, StepKind] = {}


def register_step(name: str, *, summary: Callable[[dict], str] | None = None):
    """Decorator for a step's rebuild function (``rebuild(model, step)``, in place); ``summary``
    turns a step into one line for ``vitslim info`` (default: the step's name)."""

    def register(rebuild: Callable[[nn.Module, dict], None]):
        _KINDS[name] = StepKind(rebuild, summary or (lambda step: name))
        return rebuild

    return register


def step_kind(name: str | None) -> StepKind | None:
    """How steps named ``name`` rebuild and read; None for a name no vitslim step has."""
    return _KINDS.get(name)


def steps(model: nn.Module) -> list[dict]:
    """The model's steps, oldest first (a new list; the dicts are the model's own)."""
    return list(getattr(model, STEPS_ATTR, []))


def find_step(model: nn.Module, name: str) -> dict | None:
    """The model's latest step named ``name``, or None."""
    return next((step for step in reversed(steps(model)) if step.get("method") == name), None)


def record_step(model: nn.Module, step: dict) -> None:
    """Append a structural change to the model's history; ``save`` writes it to the recipe."""
    if step_kind(step.get("method")) is None:
        raise ValueError(f"no rebuild function registered for step {step.get('method')!r}")
    set_steps(model, [*steps(model), step])


def update_step(model: nn.Module, name: str, fields: dict) -> None:
    """Add ``fields`` (what was chosen or measured, for the record) to the latest step ``name``."""
    step = find_step(model, name)
    if step is None:
        raise ValueError(f"the model has no {name!r} step to annotate")
    step.update(fields)


def drop_steps(model: nn.Module, name: str) -> None:
    """Forget every step named ``name`` (its change was undone)."""
    set_steps(model, [step for step in steps(model) if step.get("method") != name])


def set_steps(model: nn.Module, new_steps: list[dict]) -> None:
    setattr(model, STEPS_ATTR, list(new_steps))


def rebuild(model: nn.Module, step: dict, source: object) -> None:
    """Re-apply one recorded step to a freshly built ``model``; ``source`` names the folder in errors."""
    kind = step_kind(step.get("method"))
    if kind is None:
        raise VitslimError(f"{source} uses method {step.get('method')!r}, which this vitslim version cannot rebuild; upgrade vitslim")
    kind.rebuild(model, step)


def summarise(step: dict) -> str:
    """One line on a step, for people: what was changed and what was chosen or measured."""
    kind = step_kind(step.get("method"))
    return str(step.get("method")) if kind is None else kind.summarise(step)


def span(values) -> str:
    """``"4-34"`` for the range of ``values``, ``"4"`` when they are all equal."""
    values = list(values)
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"
