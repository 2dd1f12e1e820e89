"""Per-epoch checkpoints of a distillation run (``vitslim.train.distill``), pickle-free.

Each finished epoch is one folder ``epoch-NNNN/`` holding the student's weights and AdamW's
tensors (its moments) in safetensors, and everything else (epoch, step, seed, hyper-parameters,
parameter names, the optimiser's structure and scalars) in ``state.json``. Nothing is pickled, so
a checkpoint can be read without executing code. A folder is written atomically and
``state.json`` last, so an epoch folder without it is incomplete and never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from vitslim._infra.atomic import atomic_folder
from vitslim.errors import VitslimError
from vitslim.io.folder_io import load_state_strict, load_weights, read_json, unique_state_dict

logger = logging.getLogger("vitslim")

CHECKPOINT_FORMAT = "vitslim-distill-checkpoint"
CHECKPOINT_VERSION = 1
STUDENT_FILE = "student.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_EPOCH_FOLDER = re.compile(r"^epoch-(\d+)$")


def _epoch_folders(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in folder.iterdir() if entry.is_dir() and (m := _EPOCH_FOLDER.match(entry.name))]
    return sorted(found)


def remove_epochs(folder: Path, keep: Path | None = None) -> None:
    """Remove the complete epoch checkpoints in ``folder`` but ``keep``; anything else there
    (an incomplete folder, the user's files) is left alone."""
    for _, path in _epoch_folders(folder):
        if path != keep and (path / STATE_FILE).is_file():
            shutil.rmtree(path, ignore_errors=True)


def save_epoch(folder: Path, epoch: int, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
               names: list[str], config: dict, loss: float) -> None:
    """Write ``epoch``'s checkpoint to ``folder``, then remove the earlier ones. ``names`` are the
    trainable parameters in optimizer order and ``config`` the settings a resumed run must share."""
    tensors, structure = _optimizer_parts(optimizer)
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "epoch": epoch, "step": step, "seed": config["seed"], "loss": loss,
        "config": config, "parameters": names, "optimizer": structure,
    }

    def fill(staging: Path) -> None:
        safetensors.torch.save_file(unique_state_dict(student), str(staging / STUDENT_FILE), metadata={"format": "pt"})
        safetensors.torch.save_file(tensors, str(staging / OPTIMIZER_FILE), metadata={"format": "pt"})
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks the folder complete

    target = atomic_folder(folder / f"epoch-{epoch:04d}", fill)
    remove_epochs(folder, keep=target)


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``"<index>.<key>"``) and JSON for the rest."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in saved["state"].items():
        scalars[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[str(index)][key] = value
    groups = [{key: (list(v) if isinstance(v, tuple) else v) for key, v in group.items()} for group in saved["param_groups"]]
    return tensors, {"param_groups": groups, "state": scalars}


def restore_latest(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                   config: dict) -> tuple[int, int]:
    """Load the latest complete checkpoint into ``student`` and ``optimizer``; (epoch, step) to go on from."""
    complete = [(epoch, path) for epoch, path in _epoch_folders(folder) if (path / STATE_FILE).is_file()]
    if not complete:
        logger.info(f"no checkpoint in {folder} to resume from; starting at epoch 1")
        return 0, 0
    _, path = complete[-1]
    state = read_json(path / STATE_FILE, "distillation checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise VitslimError(f"{path / STATE_FILE} is not a vitslim distillation checkpoint (version {CHECKPOINT_VERSION})")
    differing = [f"{key} {state['config'].get(key)!r} → {value!r}" for key, value in config.items() if state["config"].get(key) != value]
    if differing:
        raise VitslimError(f"cannot resume from {path}: it was trained with other settings ({'; '.join(differing)}); "
                           "resume with the same settings and data, or start afresh without resume")
    if state["parameters"] != names:
        raise VitslimError(f"cannot resume from {path}: the student's trainable parameters differ from the checkpoint's")
    load_state_strict(student, load_weights(path / STUDENT_FILE), path / STUDENT_FILE)
    tensors = load_weights(path / OPTIMIZER_FILE)
    structure = state["optimizer"]
    entries: dict[int, dict] = {int(index): dict(values) for index, values in structure["state"].items()}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = tensor
    current = optimizer.state_dict()["param_groups"]
    groups = [{key: (tuple(v) if isinstance(now.get(key), tuple) else v) for key, v in group.items()}
              for group, now in zip(structure["param_groups"], current)]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    logger.info(f"resuming distillation from {path} (epoch {state['epoch']}, step {state['step']})")
    return int(state["epoch"]), int(state["step"])
