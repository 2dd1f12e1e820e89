"""The compression methods, one module each, and the registry they enter themselves in.

A method is a ``Method`` value registered from its own module in this package (as timm's
``@register_model`` does): its name, its own options, and the function that compresses. The
pipeline (``vitslim.pipeline``: images, compression, optional KD recovery, optional int8,
save), the CLI, the sweep and the demo read this registry, so adding a method means adding a
module here (and a test), nothing else. A method that changes a model's structure in a new way
also registers how that step rebuilds and reads (``vitslim.recipe.register_step``).

Every module of this package is imported with it, so every method is registered as soon as
any is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from vitslim.errors import ParameterError


@dataclass(frozen=True)
class Option:
    """One of a method's own options: a keyword of ``vitslim.compress`` and a CLI flag.

    ``kind`` is ``float``, ``int``, ``str`` or ``bool`` (a flag pair: ``--name/--off``), or
    ``vitslim.train.Training``: a training run of the method's own (CDCP's gates), given in Python as a
    ``Training`` and on the command line as its epoch count, the other settings being the
    shared ones (``--lr``, ``--batch-size``, ``--seed``, ``--device``, ``--checkpoints``).
    """

    name: str
    help: str
    kind: type = float
    default: Any = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default: --name with dashes
    off: str | None = None  # bool options: the flag that sets False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Inputs:
    """What the pipeline hands every method besides the model and the method's own options.

    ``train`` holds all the training images (a Dataset of (image, label), or an iterable of
    batches; None when none were given); ``calibration`` is ``calib_images`` of them, a seeded
    subset as batches (for a Dataset) or the batches as given.
    """

    train: Dataset | Iterable | None
    calibration: Iterable | None
    calib_images: int = 256
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class SweepBudget:
    """How ``vitslim sweep --budgets NAME=V[,V...]`` reads a method's budget numbers.

    ``options(value, cap)`` turns one number (and a parameter cap ``V@R`` where ``cap`` is
    allowed) into the method's options; ``valid`` and ``meaning`` check and explain the number.
    The sweep's ``--epochs E`` trains the method's gates (``gate_training``) and/or distils the
    result (``recovery``) for E epochs each.
    """

    name: str
    meaning: str
    valid: Callable[[float], bool]
    options: Callable[[float, float | None], dict]
    cap: bool = False
    gate_training: bool = False
    recovery: bool = False


@dataclass(frozen=True)
class Method:
    """A compression method: ``compress(original, inputs, **options)`` returns a compressed copy
    whose recipe steps describe what changed; ``report(original, compressed)`` gives the lines
    (tables) the CLI prints about it."""

    name: str
    summary: str
    compress: Callable[..., nn.Module]
    options: tuple[Option, ...] = ()
    report: Callable[[nn.Module, nn.Module], list[str]] = field(default=lambda original, compressed: [])
    needs_images: bool = True
    calibrates: bool = True  # reads ``Inputs.calibration`` (else only ``Inputs.train``)
    sweep: tuple[SweepBudget, ...] = ()

    def option(self, name: str) -> Option | None:
        return next((option for option in self.options if option.name == name), None)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Enter ``method`` in the registry (a second method of the same name is a bug)."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Take a method out of the registry (for tests that register one of their own)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ParameterError("method", f"{name!r} is not a vitslim method; choose one of {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    return list(_METHODS)


def methods() -> list[Method]:
    return list(_METHODS.values())


def sweep_budgets() -> dict[str, tuple[Method, SweepBudget]]:
    """Every sweep name, with its method and how it reads budgets."""
    return {budget.name: (method, budget) for method in methods() for budget in method.sweep}


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
