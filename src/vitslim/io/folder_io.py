"""Reading and writing the files of a model folder: JSON, safetensors weights, strict state loading.

Nothing here knows a model family, so the adapters (which read Hugging Face and timm folders) and
``persist`` (which writes vitslim folders) both build on it without importing each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from vitslim.errors import VitslimError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_JSON_DEPTH = 64  # a recipe or config nests a few levels; Python's decoder recurses once per level


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared storage written once (safetensors refuses aliased tensors)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``. Nesting is bounded before decoding: the decoder recurses once
    per level, so a file from someone else nested thousands deep would end in a RecursionError."""
    try:
        text = path.read_text()
        if _nesting(text) > MAX_JSON_DEPTH:
            raise VitslimError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels, which no {what} does; the file is corrupt or "
                               "not vitslim's: re-save the model")
        data = json.loads(text)
    except FileNotFoundError:
        raise VitslimError(f"{path} is missing; {what} needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VitslimError(f"{path} is not valid JSON ({error}); the {what} is corrupt") from None
    if not isinstance(data, dict):
        raise VitslimError(f"{path} does not hold a JSON object; the {what} is corrupt")
    return data


def _nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (brackets inside strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def stored_values(path: Path) -> int:
    """How many numbers the safetensors file at ``path`` holds, read from its header alone (no
    tensor data is read): the bound on what a recipe may build before its weights are loaded."""
    if not path.is_file():
        raise VitslimError(f"{path} is missing: the folder has no weights")
    try:
        with safetensors.safe_open(str(path), framework="pt") as weights:
            return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise VitslimError(f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupt") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VitslimError(f"{path} is missing: the folder has no weights")
    try:
        return safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise VitslimError(f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupt") from None


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names that share storage with an earlier name (tied weights): alias -> original."""
    first_name, aliases = {}, {}
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if tensor.numel() and key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
    return aliases


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load every tensor, failing with a readable summary when the checkpoint does not fit.

    Tied tensors are stored once by ``save``; their aliases are filled from the stored name.
    """
    for alias, original in _aliases(model).items():
        if alias not in state and original in state:
            state[alias] = state[original]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if items]
        raise VitslimError(f"checkpoint {source} does not match the model architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


