"""A compressed model's recipe: the structural steps applied to it, in order, and how each rebuilds.

Every method that changes a model's structure (factorised layers, pruned channels, a merge
schedule, int8 weights) appends one step, a JSON-able dict whose ``"method"`` names it, and
registers two functions under that name: one that re-applies the change to a freshly built model
(``vitslim.save`` writes the steps; loading replays them before the weights are loaded) and one
that summarises it in a line for people (``vitslim info``). The steps travel with the model as a
plain attribute; read and change them only through the functions here.

A step name read from a recipe file only ever selects one of the registered functions; nothing
named in a file is imported. A recipe may come from someone else, so each rebuild function checks
the numbers and layer names it reads against the model before it builds anything (``step_field``,
``step_number``, ``step_layer``), and the folder's loader bounds the whole (``vitslim.io.persist``).
The functions are registered when the modules defining them are imported, which ``import vitslim``
does (and so does any import of a vitslim module, first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitslim.errors import VitslimError

STEPS_ATTR = "vitslim_steps"
CORRUPT = "the folder is corrupt or was written by another vitslim version; re-save it"


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
    if not isinstance(step, dict):
        raise VitslimError(f"{source} has a recipe step that is not a JSON object ({step!r:.40}); {CORRUPT}")
    kind = step_kind(step.get("method"))
    if kind is None:
        raise VitslimError(f"{source} uses method {step.get('method')!r}, which this vitslim version cannot rebuild; upgrade vitslim")
    try:
        kind.rebuild(model, step)
    except VitslimError as error:
        raise VitslimError(f"{source}, {step['method']} step: {error}") from None


def step_field(step: dict, key: str, kind: type) -> object:
    """``step[key]`` when it is there and a ``kind``, else an error naming the field."""
    value = step.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise VitslimError(f"the step's {key!r} is {value!r:.60}, not a {kind.__name__}; {CORRUPT}")
    return value


def step_number(value: object, what: str, low: int, high: int) -> int:
    """``value`` when it is a whole number in [low, high], else an error naming ``what`` and the
    range the model allows. Checked before anything is built to that size."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise VitslimError(f"{what} is {value!r:.60}, but the model allows {low} to {high}; {CORRUPT}")
    return value


def step_layer(model: nn.Module, name: object, what: str) -> nn.Module:
    """The module at the qualified ``name``, or an error naming ``what`` and the missing path."""
    try:
        if not isinstance(name, str) or not name:
            raise AttributeError
        return model.get_submodule(name)
    except AttributeError:
        raise VitslimError(f"{what} names layer {name!r:.80}, which the model does not have; {CORRUPT}") from None


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
