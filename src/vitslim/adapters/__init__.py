"""One adapter per model family; ``describe(model)`` picks the right one.

Families are tried in order: timm, Hugging Face, then plain ``torch.nn`` (the most permissive).
Each is a module that implements ``ModelFamily``.
"""

from __future__ import annotations

from torch import nn

from vitslim.adapters import base, hf, timm_vit, torch_nn
from vitslim.adapters.base import PREPROCESSING_ATTR, ModelFamily, Preprocessing, ViTSpec
from vitslim.errors import VitslimError

FAMILIES: tuple[ModelFamily, ...] = (timm_vit, hf, torch_nn)

__all__ = [
    "FAMILIES", "PREPROCESSING_ATTR", "ModelFamily", "Preprocessing", "ViTSpec", "describe", "family_named", "family_of",
    "matching_family", "prepare_for_replacement", "replaceable_linears",
]


def matching_family(model: nn.Module) -> ModelFamily | None:
    """The first family ``model`` belongs to, or None for a module vitslim does not know as a ViT."""
    return next((family for family in FAMILIES if family.matches(model)), None)


def family_of(model: nn.Module) -> ModelFamily:
    family = matching_family(model)
    if family is not None:
        return family
    raise VitslimError(
        f"{type(model).__name__} is not a ViT vitslim understands: expected a timm VisionTransformer, "
        "a Hugging Face ViTForImageClassification, or a model built from nn.TransformerEncoderLayer"
    )


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.FAMILY == name:
            return family
    raise VitslimError(f"unknown model family '{name}' (known: {', '.join(f.FAMILY for f in FAMILIES)})")


def prepare_for_replacement(model: nn.Module, part: nn.Module | None = None) -> None:
    """Called before a method replaces Linears with other modules: a family whose layers can
    bypass their child modules (torch.nn's fused encoder kernel) switches that off here. With
    ``part``, only that piece (e.g. a copy of one block) of ``model`` is prepared."""
    family_of(model).prepare_for_replacement(model if part is None else part)


def replaceable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears a replacement layer may take, by qualified name: the family's rule, and for a
    module of no known family (int8 quantises any module) the rule every family shares."""
    family = matching_family(model)
    return family.replaceable_linears(model) if family is not None else base.replaceable_linears(model)


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the qualified ``name`` points inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def describe(model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
    """The structure and preprocessing of ``model`` that compression methods rely on."""
    return family_of(model).describe(model, preprocessing, **hints)
