"""``load_model``: one entry point for every way a user can name a model."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from torch import nn

from vitslim.adapters import hf, timm_vit
from vitslim.errors import VitslimError
from vitslim.io.folder_io import WEIGHTS_FILE, load_state_strict, load_weights, read_json
from vitslim.io.persist import is_vitslim_folder, load_folder

LOCAL_DIR = "local-dir:"
PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.pt", "checkpoint.pth")


def load_model(spec: str | os.PathLike | nn.Module, *, pretrained: bool = False, skeleton: nn.Module | None = None) -> nn.Module:
    """Return an ``nn.Module`` in eval mode for any supported way of naming a model.

    ``spec`` may be an ``nn.Module`` (returned as is), a vitslim output folder, a timm folder
    (``local-dir:PATH`` or a bare path holding ``config.json`` + ``model.safetensors``), a Hugging
    Face ViT or DINOv2 folder (as ``save_pretrained`` writes it), or a timm model name (random init
    unless ``pretrained``). ``skeleton`` is the freshly constructed module a plain-PyTorch vitslim
    folder is loaded into.
    """
    if isinstance(spec, nn.Module):
        return spec
    text = os.fspath(spec)
    if text.startswith(LOCAL_DIR):
        return _load_timm_folder(_existing_folder(text[len(LOCAL_DIR):]))
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or text.startswith("."):
        folder = _existing_folder(text)
        if is_vitslim_folder(folder):
            return load_folder(folder, skeleton=skeleton)
        if hf.is_hf_folder(folder):
            return hf.load_hf_folder(folder)
        return _load_timm_folder(folder)
    return _create_timm(text, pretrained)


def _existing_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise VitslimError(f"model folder {text} does not exist")
    if not path.is_dir():
        raise VitslimError(f"{text} is a file; pass the folder that holds config.json and {WEIGHTS_FILE}")
    return path


def _refuse_pickles(folder: Path) -> None:
    if (folder / WEIGHTS_FILE).is_file():
        return
    pickles = [name for name in PICKLE_NAMES if (folder / name).is_file()]
    if pickles:
        raise VitslimError(
            f"{folder} holds only {pickles[0]}, a pickle, which vitslim never loads (it can run code); "
            f"convert it to {WEIGHTS_FILE} with safetensors.torch.save_file(model.state_dict(), ...)"
        )
    raise VitslimError(f"{folder} has no {WEIGHTS_FILE}; a model folder needs config.json and {WEIGHTS_FILE}")


def _load_timm_folder(folder: Path) -> nn.Module:
    import timm

    config_path = folder / "config.json"
    config = read_json(config_path, "timm model folder")
    if "architecture" not in config:
        _refuse_other_hf_models(folder, config.get("model_type"))
        raise VitslimError(f"{config_path} names no 'architecture'; it is not a timm model folder")
    if not timm_vit.is_architecture(config["architecture"]):
        raise VitslimError(
            f"{config_path} names architecture {config['architecture']!r}, which timm {timm.__version__} does not know "
            f"(a typo in config.json, or a folder from a newer timm){_name_hint(config['architecture'])}"
        )
    _refuse_pickles(folder)
    # timm's save_for_hf records every create_model argument in model_args, num_classes too; the
    # top-level num_classes is the model's current one (timm checks they agree when it writes them)
    model_args = {name: value for name, value in config.get("model_args", {}).items() if name != "num_classes"}
    num_classes = config.get("num_classes", config.get("model_args", {}).get("num_classes"))
    model = _create_timm(config["architecture"], pretrained=False, num_classes=num_classes, **model_args)
    load_state_strict(model, load_weights(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    # timm's own local-dir parser turns config.json into pretrained_cfg (preprocessing, label names)
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, _, _ = load_model_config_from_path(folder)
    model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg}
    setattr(model, timm_vit.TIMM_CONFIG_ATTR, {
        "architecture": config["architecture"],
        "num_classes": int(model.num_classes),
        "model_args": model_args,
    })
    if not timm_vit.matches(model):
        raise VitslimError(f"{folder} holds a timm {type(model).__name__}, not a Vision Transformer")
    return model.eval()


def _refuse_other_hf_models(folder: Path, model_type: object) -> None:
    """Only Hugging Face configs carry a ``model_type``: name the one found, not a missing timm field.
    A supported one reaches here only through ``local-dir:``, timm's prefix, which a Hugging Face folder does not take."""
    if model_type is None:
        return
    if model_type in hf.MODEL_TYPES:
        raise VitslimError(
            f"{folder} is a Hugging Face folder (model type {model_type!r}), not a timm one; pass its path without '{LOCAL_DIR}'"
        )
    raise VitslimError(
        f"{folder} holds a Hugging Face model of type {model_type!r}, which vitslim does not load (supported Hugging Face "
        f"model types: {hf.SUPPORTED}); pass a ViT or DINOv2, from Hugging Face or timm"
    )


def _name_hint(name: object) -> str:
    """The close timm names to suggest for an unknown ``name``, as a clause to end a message."""
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3) if isinstance(name, str) else []
    return f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*vit*')` lists the names"


def _create_timm(name: str, pretrained: bool, num_classes: int | None = None, **model_args) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise VitslimError(f"unknown model '{name}': not a timm model name nor an existing folder{_name_hint(name)}")
    kwargs = dict(model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        raise VitslimError(f"timm cannot build '{name}' with arguments {sorted(kwargs)}: {error}") from None
    except (OSError, RuntimeError) as error:
        if pretrained:
            raise VitslimError(
                f"cannot fetch pretrained weights for '{name}' ({type(error).__name__}); without a reachable "
                "model hub, pass a local folder (config.json + model.safetensors) instead"
            ) from None
        raise
    return model.eval()
