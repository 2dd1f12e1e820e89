"""What a compression method is, and the registry of them.

A method is a frozen dataclass deriving from ``Method`` (the shape of torchao's
``quantize_(model, config)``): its fields are its settings, the one place they are described.
A field owns its default, its type (``float``, ``int``, ``str``, ``bool``, a ``Literal`` of
choices, or ``vitslim.Training`` for a training run of the method's own, such as CDCP's gates),
and, through ``setting(...)``, its help text; ``__post_init__`` checks the values, so a config
that exists is a valid one. ``compress(model, inputs)`` does the work and ``report`` describes a
result. ``@register_method`` enters the class under its ``name``.

Everything else reads the registry: ``vitslim.compress(model, config, images)`` (the pipeline:
calibration images, the method, optional KD recovery, optional int8), the CLI (which generates
``vitslim compress --method M``'s flags from M's fields, a ``Training`` field becoming an
epoch-count flag), the sweep (``Method.sweep``) and the demo (``Method.examples``). Adding a
method is a module that defines and registers one class, and a test.

The built-in methods register when their modules are imported, which ``import vitslim`` does;
every import of a vitslim module runs that first, so the registry is complete whenever it is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn
from torch.utils.data import Dataset

from vitslim.errors import ParameterError
from vitslim.train import Training

_METADATA = "vitslim"
KINDS = (float, int, str, bool, Training)


def setting(default: Any = None, help: str = "", *, flag: str | None = None, off: str | None = None, cli: bool = True,
            folder: str | None = None) -> Any:
    """A method's field with its help text. ``flag`` replaces the CLI flag ``--name`` (with dashes);
    ``off`` is a bool's flag that sets False; ``cli=False`` keeps a setting for Python callers only;
    ``folder`` is the checkpoint sub-folder of a ``Training`` setting (default: its name)."""
    return field(default=default, metadata={_METADATA: {"help": help, "flag": flag, "off": off, "cli": cli, "folder": folder}})


@dataclass(frozen=True)
class Setting:
    """One field of a method, as the CLI, the sweep and error messages see it."""

    name: str
    kind: type  # one of KINDS (object for a Python-only setting)
    help: str
    default: Any
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    off: str | None = None
    cli: bool = True
    folder: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _kind(annotation: Any, where: str) -> tuple[type, tuple[str, ...] | None]:
    """The setting kind of a field's type: ``X | None`` is X; a ``Literal`` of strings is ``str``
    with those choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: a setting has one type (optionally | None), not {annotation}")
        annotation = inner[0]
    if typing.get_origin(annotation) is Literal:
        return str, tuple(typing.get_args(annotation))
    if annotation not in KINDS:
        raise TypeError(f"{where}: a setting's type is one of float, int, str, bool, a Literal or Training, not {annotation}")
    return annotation, None


@dataclass(frozen=True)
class Inputs:
    """What the pipeline hands every method besides the model and the method's own settings.

    ``train`` holds all the training images (a Dataset of (image, label), or an iterable of
    batches; None when none were given); ``calibration`` is ``calib_images`` of them, a seeded
    subset as batches (for a Dataset) or the batches as given. ``objective`` is how every
    candidate is judged against the original ("auto" follows the model's output:
    ``vitslim.measure.objective``), passed to each step that judges one.
    """

    train: Dataset | Iterable | None = None
    calibration: Iterable | None = None
    calib_images: int = 256
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    objective: str = "auto"


@dataclass(frozen=True)
class SweepBudget:
    """How ``vitslim sweep --budgets NAME=V[,V...]`` reads a method's budget numbers.

    ``options(value, cap)`` turns one number (and a parameter cap ``V@R`` where ``cap`` is
    allowed) into the method's settings; ``valid`` and ``meaning`` check and explain the number.
    The sweep's ``--epochs E`` sets every ``Training`` setting of the method to E epochs and,
    with ``recovery``, distils the result for E epochs too.
    """

    name: str
    meaning: str
    valid: Callable[[float], bool]
    options: Callable[[float, float | None], dict]
    cap: bool = False
    recovery: bool = False


@dataclass(frozen=True)
class Example:
    """One model the demo builds with this method: its label, folder, settings and a note."""

    label: str
    folder: str
    options: dict
    note: str


@dataclass(frozen=True)
class Method:
    """Base of every method's config (module docstring). Subclasses set the class attributes and
    ``compress``; their fields are their settings."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_images: ClassVar[bool] = True
    calibrates: ClassVar[bool] = True  # reads ``Inputs.calibration`` (else only ``Inputs.train``)
    sweep: ClassVar[tuple[SweepBudget, ...]] = ()
    examples: ClassVar[tuple[Example, ...]] = ()

    def compress(self, model: nn.Module, inputs: Inputs) -> nn.Module:
        """A compressed copy of ``model``, whose recipe steps describe what changed."""
        raise NotImplementedError

    def report(self, original: nn.Module, compressed: nn.Module) -> list[str]:
        """Lines (tables) the CLI prints about a result."""
        return []

    def chosen(self, compressed: nn.Module) -> str:
        """What this method chose for ``compressed`` where the config left it open, in a few words
        (the demo's table shows it beside the example's note); empty when there is nothing to say."""
        return ""

    @property
    def plans_int8(self) -> bool:
        """Whether this config decides the result's int8 itself (``planned_int8``), so that the
        pipeline's own ``int8`` must not be given as well."""
        return False

    def planned_int8(self, compressed: nn.Module) -> tuple[str, tuple[str, ...]] | None:
        """The int8 kind and the Linears to keep in float32 that this method planned for
        ``compressed``, which the pipeline applies after any recovery; None for none."""
        return None

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        hints = typing.get_type_hints(cls)
        made = []
        for each in dataclasses.fields(cls):
            meta = each.metadata.get(_METADATA, {})
            # a Python-only setting may be of any type; one the CLI and the sweep set must be of a kind they can parse
            kind, choices = _kind(hints[each.name], f"{cls.__name__}.{each.name}") if meta.get("cli", True) else (object, None)
            made.append(Setting(each.name, kind, meta.get("help", ""), each.default, choices, meta.get("flag"), meta.get("off"),
                                meta.get("cli", True), meta.get("folder")))
        return tuple(made)

    @classmethod
    def setting(cls, name: str) -> Setting | None:
        return next((each for each in cls.settings() if each.name == name), None)

    def __post_init__(self) -> None:
        for each in self.settings():
            if each.choices is not None and getattr(self, each.name) not in (*each.choices, None):
                raise ParameterError(each.name, f"is {getattr(self, each.name)!r}; choose one of {', '.join(each.choices)}")
            if each.kind is Training and getattr(self, each.name) is not None and not isinstance(getattr(self, each.name), Training):
                raise ParameterError(each.name, f"is a training run: give a vitslim.Training, not {getattr(self, each.name)!r}")


_METHODS: dict[str, type[Method]] = {}


def register_method(method: type[Method]) -> type[Method]:
    """Class decorator: enter ``method`` in the registry (a second method of the same name is a bug).
    Its settings are read once here, so a field of an unsupported type fails at definition."""
    if not method.name:
        raise ValueError(f"{method.__name__} has no name")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    method.settings()
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Take a method out of the registry (for tests that register one of their own)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ParameterError("method", f"{name!r} is not a vitslim method; choose one of {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    return list(_METHODS)


def methods() -> list[type[Method]]:
    return list(_METHODS.values())


def configure(method: str | Method, **options: Any) -> Method:
    """The config ``method`` names, built from ``options`` (a config is returned as it is; options
    beside one are a mistake)."""
    if isinstance(method, Method):
        if options:
            raise ParameterError(sorted(options)[0], f"is given beside a {type(method).__name__} config; set it in the config")
        return method
    if isinstance(method, type) and issubclass(method, Method):
        chosen = method
    else:
        chosen = get_method(method)
    names = [each.name for each in chosen.settings()]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ParameterError(unknown[0], f"is not an option of the {chosen.name} method; its options are {', '.join(names) or 'none'}")
    return chosen(**options)


def sweep_budgets() -> dict[str, tuple[type[Method], SweepBudget]]:
    """Every sweep name, with its method and how it reads budgets."""
    return {budget.name: (method, budget) for method in methods() for budget in method.sweep}
