"""Changing a model's modules without losing the forward hooks that something keeps on them.

Token merging runs through forward hooks on the model's blocks and attention modules. A step that
later replaces modules (int8 layers, an unpacked attention, sliced channels) or copies the model
would leave those hooks on modules that are gone, or copy handles that still point at the
original. The code that owns such hooks registers how to take them off and put them back
(``register_hook_owner``); the code that replaces modules wraps the change in
``replacing_modules`` and copies with ``copy_model``, and so needs to know nothing about merging.
That keeps the recipe's steps in the order they were applied: each one, replayed, hands the hooks
on to the modules it puts in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class HookOwner:
    """How one kind of hook state leaves a model and comes back: ``detach(model)`` takes the hooks off
    and returns what ``attach(model, state)`` needs to put them on the modules the model has then
    (None: the model carries none of them)."""

    detach: Callable[[nn.Module], object | None]
    attach: Callable[[nn.Module, object], None]


_OWNERS: list[HookOwner] = []


def register_hook_owner(detach: Callable[[nn.Module], object | None], attach: Callable[[nn.Module, object], None]) -> None:
    """Declare hooks that must follow the model through module replacements and copies."""
    _OWNERS.append(HookOwner(detach, attach))


def _detach_all(model: nn.Module) -> list[tuple[HookOwner, object]]:
    taken = []
    for owner in _OWNERS:
        state = owner.detach(model)
        if state is not None:
            taken.append((owner, state))
    return taken


def _attach_all(model: nn.Module, taken: list[tuple[HookOwner, object]]) -> None:
    for owner, state in taken:
        owner.attach(model, state)


@contextmanager
def replacing_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every registered owner's hooks off while the with-block replaces its modules,
    then put back on the modules it has then. The recipe is left as it is."""
    taken = _detach_all(model)
    try:
        yield model
    finally:
        _attach_all(model, taken)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` carrying the same registered hooks, bound to the copy's own modules
    (a plain ``copy.deepcopy`` would copy hook handles that remove the original's hooks)."""
    taken = _detach_all(model)
    try:
        duplicate = copy.deepcopy(model)
    finally:
        _attach_all(model, taken)
    _attach_all(duplicate, taken)
    return duplicate
