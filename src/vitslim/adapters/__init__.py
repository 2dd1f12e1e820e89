"""One adapter per model family; ``describe(model)`` picks the right one.

Families are tried in order: timm, Hugging Face, then plain ``torch.nn`` (the most permissive).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from vitslim.adapters import hf, timm_vit, torch_nn
from vitslim.adapters.base import PREPROCESSING_ATTR, Preprocessing, ViTSpec
from vitslim.errors import VitslimError

FAMILIES: tuple[ModuleType, ...] = (timm_vit, hf, torch_nn)

__all__ = ["FAMILIES", "PREPROCESSING_ATTR", "Preprocessing", "ViTSpec", "describe", "family_of", "family_named"]


def family_of(model: nn.Module) -> ModuleType:
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise VitslimError(
        f"{type(model).__name__} is not a ViT vitslim understands: expected a timm VisionTransformer, "
        "a Hugging Face ViTForImageClassification, or a model built from nn.TransformerEncoderLayer"
    )


def family_named(name: str) -> ModuleType:
    for family in FAMILIES:
        if family.FAMILY == name:
            return family
    raise VitslimError(f"unknown model family '{name}' (known: {', '.join(f.FAMILY for f in FAMILIES)})")


def describe(model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
    """The structure and preprocessing of ``model`` that compression methods rely on."""
    return family_of(model).describe(model, preprocessing, **hints)
