"""One adapter per model family; ``describe(model)`` picks the right one.

Families are tried in order: timm, Hugging Face, then plain ``torch.nn`` (the most permissive).
Each is a module that implements ``ModelFamily``.

A model need not be a ViT itself: a user's segmentation or saliency model whose ``backbone`` is
one is compressed through that backbone (``locate``), while everything that judges the result
(calibration choices, distillation, evaluation) runs the whole model. The spec of such a model
names its layers from the whole model, so a recipe replays on the user's skeleton.
"""

from __future__ import annotations

from torch import nn

from vitslim.adapters import base, hf, timm_vit, torch_nn
from vitslim.adapters.base import PREPROCESSING_ATTR, ModelFamily, Preprocessing, ViTSpec
from vitslim.errors import VitslimError

FAMILIES: tuple[ModelFamily, ...] = (timm_vit, hf, torch_nn)

__all__ = [
    "FAMILIES", "PREPROCESSING_ATTR", "ModelFamily", "Preprocessing", "ViTSpec", "describe", "family_named", "family_of",
    "locate", "matching_family", "prepare_for_replacement", "replaceable_linears",
]


def matching_family(model: nn.Module) -> ModelFamily | None:
    """The first family ``model`` belongs to, or None for a module vitslim does not know as a ViT."""
    return next((family for family in FAMILIES if family.matches(model)), None)


def locate(model: nn.Module) -> tuple[str, nn.Module]:
    """The qualified name and module of the ViT inside ``model`` ("" and ``model`` when it is
    one): the outermost module a family recognises. Two ViTs side by side (a two-tower model) are
    refused, since a method compresses one network and would not know which."""
    if matching_family(model) is not None:
        return "", model
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(outer + ".") for outer, _ in found) and matching_family(module) is not None:
            found.append((name, module))
    if len(found) > 1:
        raise VitslimError(
            f"{type(model).__name__} holds several ViTs ({', '.join(name for name, _ in found)}); vitslim compresses one "
            "network at a time: pass the one to compress (e.g. model.visual) and keep the rest as it is"
        )
    if not found:
        raise VitslimError(
            f"{type(model).__name__} is not a ViT vitslim understands, nor does it hold one: expected a timm VisionTransformer, "
            "a Hugging Face ViT or DINOv2, or a model built from nn.TransformerEncoderLayer (alone or inside your own model)"
        )
    return found[0]


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model``, or of the ViT it holds."""
    family = matching_family(model)
    return family if family is not None else matching_family(locate(model)[1])


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
    """The structure and preprocessing of ``model`` (or of the ViT inside it) that compression
    methods rely on; ``spec.root`` is ``model`` itself, whose output is what they preserve."""
    path, vit = locate(model)
    if vit is model:
        return family_of(model).describe(model, preprocessing, **hints)
    spec = family_of(vit).describe(vit, preprocessing or getattr(model, PREPROCESSING_ATTR, None), **hints)
    spec.root, spec.path = model, path
    return spec
