"""Saving and reloading models as a folder: ``model.safetensors`` + ``recipe.json`` + ``config.json``.

Nothing is pickled and nothing named in a file is imported or executed: the recipe names a model
family and the arguments that family's adapter needs to rebuild the architecture, then lists the
structural steps (low-rank factors, pruned channels, merge schedules) that later methods applied,
each replayed by a registered function before the weights are loaded strictly.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from vitslim import __version__
from vitslim._infra.atomic import atomic_folder, check_writable
from vitslim.adapters import PREPROCESSING_ATTR, describe, family_named, family_of, locate
from vitslim.adapters.base import Preprocessing
from vitslim.errors import VitslimError
from vitslim.io import recipe as recipes
from vitslim.io.folder_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_state_strict,
    load_weights,
    read_json,
    stored_values,
    unique_state_dict,
)

RECIPE_FILE = "recipe.json"
RECIPE_FORMAT = "vitslim"
RECIPE_VERSION = 2
"""2 (vitslim 0.3): a merge schedule's "atme" is ATME's neighbouring bipartite reading and records
its radius; an "atme" without one (version 1) is the lattice reading, and loads as it. A vitslim
that knows only version 1 refuses these folders instead of merging by the wrong reading."""
RUNAWAY_FACTOR = 1000
"""How many times the weights file's values a recipe's architecture and steps may register while
they are rebuilt on the meta device before the loader gives up on them (``_check_size``)."""


def _versions() -> dict:
    import timm

    return {"vitslim": __version__, "torch": torch.__version__, "timm": timm.__version__}


def _config_json(family: str, architecture: dict, preprocessing: Preprocessing, label_names, wrapped: dict | None) -> dict:
    """A config.json its own library can read: timm's folder format, or HF's config."""
    if wrapped:
        return {"family": family, "wrapped": wrapped,
                "note": f"a {wrapped['class']} holding a {family} ViT at '{wrapped['path']}'; reload with vitslim.load_model(folder, skeleton=...)"}
    if family == "hf":
        return architecture["config"]
    if family == "timm":
        config = {
            "architecture": architecture["architecture"],
            "num_classes": architecture["num_classes"],
            "model_args": architecture.get("model_args", {}),
            "pretrained_cfg": {**preprocessing.as_dict(), "num_classes": architecture["num_classes"]},
        }
        if label_names:
            config["label_names"] = list(label_names)
        return config
    return {"family": family, "note": "plain PyTorch model; reload with vitslim.load_model(folder, skeleton=...)"}


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any long work, an output that ``save`` would refuse or could not write."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / RECIPE_FILE).is_file())):
        raise VitslimError(f"{folder} exists and is not an empty folder or a vitslim model folder; choose another output path")
    check_writable(folder)
    return folder


def save(model: nn.Module, folder: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model`` to ``folder`` (created, or replaced when it is a previous vitslim folder).

    A user's model holding a ViT is saved whole (every weight, the ViT's recipe steps named from
    the whole model); reloading it needs the user's class, as for plain PyTorch models.
    The folder is written whole or not at all (see ``vitslim._infra.atomic``).
    """
    folder = check_output_folder(folder)
    spec = describe(model)
    family = family_of(model)
    architecture = family.architecture(spec.model)
    wrapped = {"path": spec.path, "class": type(model).__name__} if spec.root is not None else None
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "family": family.FAMILY,
        "architecture": architecture,
        "preprocessing": spec.preprocessing.as_dict(),
        "label_names": spec.label_names,
        "steps": recipes.steps(model),
        **({"wrapped": wrapped} if wrapped else {}),
        "versions": _versions(),
        **(extra or {}),
    }

    def fill(staging: Path) -> None:
        safetensors.torch.save_file(unique_state_dict(model), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        (staging / CONFIG_FILE).write_text(json.dumps(_config_json(family.FAMILY, architecture, spec.preprocessing, spec.label_names, wrapped), indent=2))

    return atomic_folder(folder, fill)


def is_vitslim_folder(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file()


def _check_size(folder: Path, family, architecture: object, steps: list) -> None:
    """Refuse a recipe that would build a model holding more numbers than the folder's weights
    file, before anything is allocated: the architecture and its steps are rebuilt on the meta
    device (shapes only), counting what each layer registers, and the result is compared with
    the file's header. A recipe from someone else can thus not make the loader allocate more
    than the weights it comes with.

    Every whole number of the architecture is first held to the same bound (no count or size in
    a model exceeds its number of weights), so that a corrupt depth does not build millions of
    empty layers. While rebuilding, a guard stops a runaway recipe early; it is loose, because
    a channel-pruned model's architecture is built whole before its step cuts it, and so may hold
    many times what the file holds (``RUNAWAY_FACTOR``)."""
    weights = folder / WEIGHTS_FILE
    stored = stored_values(weights)
    too_large = [value for value in _whole_numbers(architecture) if abs(value) > stored]
    if too_large:
        raise VitslimError(f"{folder / RECIPE_FILE}'s architecture holds the number {too_large[0]:,}, more than the {stored:,} "
                           f"values in {weights}; {recipes.CORRUPT}")
    limit = RUNAWAY_FACTOR * (len(steps) + 1) * stored
    with torch.device("meta"), _registered_values_below(limit, folder, stored):
        try:
            planned = family.build(architecture)
        except VitslimError:
            raise
        except Exception as error:  # the family's library refusing the recipe's arguments, in any of its ways
            raise VitslimError(f"{folder / RECIPE_FILE}'s architecture cannot be built ({type(error).__name__}: {error}); "
                               f"{recipes.CORRUPT}") from None
        for step in steps:
            recipes.rebuild(planned, step, folder / RECIPE_FILE)
    built = _values(planned)
    if built > stored:
        raise VitslimError(f"{folder / RECIPE_FILE} builds a model of {built:,} values, but {weights} holds {stored:,}; {recipes.CORRUPT}")


def _whole_numbers(value: object):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _whole_numbers(item)
    elif isinstance(value, int) and not isinstance(value, bool):
        yield value


@contextlib.contextmanager
def _registered_values_below(limit: int, folder: Path, stored: int):
    """Within the block, stop (with an error) once the parameters and buffers registered in any
    module hold ``limit`` values; an empty one counts as one, so empty layers cannot run away."""
    registered = 0

    def add(module, name, tensor):
        nonlocal registered
        registered += max(tensor.numel(), 1) if tensor is not None else 1
        if registered > limit:
            raise VitslimError(f"{folder / RECIPE_FILE} builds a model of more than {limit:,} values, but {folder / WEIGHTS_FILE} "
                               f"holds {stored:,}; {recipes.CORRUPT}")

    handles = [module_hooks.register_module_parameter_registration_hook(add), module_hooks.register_module_buffer_registration_hook(add)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _values(model: nn.Module) -> int:
    """The numbers ``save`` would write for ``model``: its parameters and persistent buffers, a
    tensor shared by several modules once."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module._parameters.values(),
                   *(buffer for name, buffer in module._buffers.items() if name not in module._non_persistent_buffers_set)]
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
    return total


def load_folder(folder: Path, *, skeleton: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by ``save``: architecture from the recipe, steps replayed, weights loaded."""
    recipe = read_json(folder / RECIPE_FILE, "vitslim recipe")
    if recipe.get("format") != RECIPE_FORMAT or not isinstance(recipe.get("version"), int):
        raise VitslimError(f"{folder / RECIPE_FILE} is not a vitslim recipe")
    if recipe["version"] > RECIPE_VERSION:
        raise VitslimError(f"{folder} was written by a newer vitslim (recipe version {recipe['version']}); upgrade vitslim")
    family = family_named(recipe.get("family", ""))
    wrapped = recipe.get("wrapped")
    if wrapped and skeleton is None:
        raise VitslimError(f"{folder} holds a {wrapped['class']} with a ViT at '{wrapped['path']}', a model vitslim cannot build: "
                           f"load it with vitslim.load_model(folder, skeleton={wrapped['class']}(...)), a freshly built model of that class")
    if wrapped and locate(skeleton)[0] != wrapped["path"]:
        raise VitslimError(f"{folder} was saved from a model whose ViT is at '{wrapped['path']}', but the skeleton's is at "
                           f"'{locate(skeleton)[0] or '(the skeleton itself)'}'; pass a model of the class it was saved from ({wrapped['class']})")
    steps = recipe.get("steps", [])
    if not isinstance(steps, list):
        raise VitslimError(f"{folder / RECIPE_FILE} has steps that are not a list; {recipes.CORRUPT}")
    if skeleton is None:
        _check_size(folder, family, recipe["architecture"], steps)
        model = family.build(recipe["architecture"])
    else:  # the caller built it: only the steps can grow it, and each checks its numbers against it
        model = skeleton
    for step in steps:
        recipes.rebuild(model, step, folder / RECIPE_FILE)
    recipes.set_steps(model, steps)
    load_state_strict(model, load_weights(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    setattr(model, PREPROCESSING_ATTR, Preprocessing.from_dict(recipe["preprocessing"]))
    if recipe.get("label_names") and family.FAMILY == "timm":
        vit = locate(model)[1]
        vit.pretrained_cfg = {**dict(getattr(vit, "pretrained_cfg", {}) or {}), "label_names": recipe["label_names"]}
    return model.eval()
