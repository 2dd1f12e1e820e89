"""Choices a user makes once and every later method reads: kept on the model as plain attributes
(not modules, not in the state dict), so copies made later keep them and a saved folder does not."""

from __future__ import annotations

from torch import nn

from vitslim.errors import ParameterError


def set_choice(model: nn.Module, attribute: str, parameter: str, value: str, choices: tuple[str, ...]) -> None:
    """Keep ``value`` (one of ``choices``, which start with "auto") as ``model.<attribute>``; "auto"
    removes it, leaving the decision to whoever reads it. ``parameter`` names the option in errors."""
    if value not in choices:
        raise ParameterError(parameter, f"is {value!r}; choose one of {', '.join(choices)}")
    if value == "auto":
        if hasattr(model, attribute):
            delattr(model, attribute)
        return
    object.__setattr__(model, attribute, value)
