"""Adapter for Hugging Face ``transformers`` ``ViTForImageClassification``, and its folders.

transformers renamed the ViT modules in 5.0 (``vit.layers[i].attention.q_proj`` instead of
``vit.encoder.layer[i].attention.attention.query``); both layouts are read, because the ``hf``
extra accepts transformers 4.40 and later. transformers is imported only when a model has to be
built, so vitslim works without it for the other families.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from vitslim.adapters.base import (
    PREPROCESSING_ATTR,
    AttentionSpec,
    BlockSpec,
    MlpSpec,
    Preprocessing,
    ViTSpec,
    add_bias,
)

# the rule shared by all families (transformers' ViT calls every Linear it holds), as this family's protocol member
from vitslim.adapters.base import replaceable_linears as replaceable_linears
from vitslim.errors import VitslimError
from vitslim.folder_io import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_json

FAMILY = "hf"
CLASS_NAME = "ViTForImageClassification"
# The config ``model_type`` of the one Hugging Face model family vitslim loads (as CLASS_NAME).
MODEL_TYPE = "vit"
PROCESSOR_FILE = "preprocessor_config.json"
PICKLE_FILE = "pytorch_model.bin"
# PIL resampling codes, as image processors store them, in timm's interpolation vocabulary
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class _Layout:
    """Where one transformers version keeps the encoder layers and, inside a layer, its Linears."""

    layers: str
    q: str
    k: str
    v: str
    out: str
    fc1: str
    fc2: str


_LAYOUTS = (
    _Layout("vit.layers", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    _Layout(  # transformers 4.x
        "vit.encoder.layer",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
)


def _layout(model: nn.Module) -> _Layout | None:
    for layout in _LAYOUTS:
        try:
            layers = model.get_submodule(layout.layers)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layout
    return None


def _import_transformers() -> ModuleType:
    from vitslim._compat import import_torchvision

    import_torchvision()  # transformers' vision code imports torchvision; see vitslim._compat
    try:
        import transformers
    except ImportError:
        raise VitslimError(
            "this is a Hugging Face model and needs the transformers package: install it with "
            "pip install 'vitslim[hf]'"
        ) from None
    return transformers


def matches(model: nn.Module) -> bool:
    """Recognise the class by name, so that matching never imports transformers."""
    cls = type(model)
    return cls.__module__.startswith("transformers.") and cls.__name__ == CLASS_NAME and _layout(model) is not None


def _pair(value) -> tuple[int, int]:
    """Configs give sizes as an int or an (height, width) pair."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def default_preprocessing(config) -> Preprocessing:
    """What ``ViTImageProcessor`` does by default: squash-resize to the model size, normalise by 0.5."""
    return Preprocessing(
        input_size=(int(config.num_channels), *_pair(config.image_size)),
        mean=(0.5,) * config.num_channels,
        std=(0.5,) * config.num_channels,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
    )


def _label_names(config) -> list[str] | None:
    """Real class names, or None when transformers only made up ``LABEL_i`` placeholders."""
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    return None if names == [f"LABEL_{i}" for i in range(config.num_labels)] else names


def _block(index: int, layer: nn.Module, layout: _Layout, num_heads: int) -> BlockSpec:
    q, k, v, out, fc1, fc2 = (
        layer.get_submodule(path) for path in (layout.q, layout.k, layout.v, layout.out, layout.fc1, layout.fc2)
    )
    attention = AttentionSpec(
        module=layer.attention, out_proj=out, num_heads=num_heads, head_dim=q.out_features // num_heads, q=q, k=k, v=v
    )
    return BlockSpec(index, layer, attention, MlpSpec(fc1=fc1, fc2=fc2))


def describe(model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
    if hints:
        raise VitslimError(f"Hugging Face models describe themselves through their config; unexpected hints {sorted(hints)}")
    layout = _layout(model)
    if layout is None:
        raise VitslimError(f"{type(model).__name__} has neither vit.layers nor vit.encoder.layer; this transformers layout is not supported")
    config = model.config
    preprocessing = preprocessing or getattr(model, PREPROCESSING_ATTR, None) or default_preprocessing(config)
    image_size, patch_size = _pair(config.image_size), _pair(config.patch_size)
    if tuple(preprocessing.input_size[1:]) != image_size:
        # the forward pass would fail on the first batch with a shape error far from the cause
        raise VitslimError(
            f"the model's config expects {image_size[0]}x{image_size[1]} images but the preprocessing gives "
            f"{preprocessing.input_size[1]}x{preprocessing.input_size[2]}; fix preprocessor_config.json or the preprocessing passed in"
        )
    layers = model.get_submodule(layout.layers)
    return ViTSpec(
        family=FAMILY,
        model=model,
        blocks=[_block(i, layer, layout, int(config.num_attention_heads)) for i, layer in enumerate(layers)],
        num_prefix_tokens=1,
        grid_size=(image_size[0] // patch_size[0], image_size[1] // patch_size[1]),
        patch_size=patch_size,
        preprocessing=preprocessing,
        embed_dim=int(config.hidden_size),
        num_classes=int(config.num_labels),
        label_names=_label_names(config),
        prefix_kinds={"class": 1},
    )


def architecture(model: nn.Module) -> dict:
    return {"config": model.config.to_dict()}


def build(architecture: dict) -> nn.Module:
    """An untrained model of the recorded shape (float32, eval mode)."""
    transformers = _import_transformers()
    return transformers.ViTForImageClassification(_config(transformers, architecture["config"])).eval()


def _config(transformers: ModuleType, data: dict):
    try:
        return transformers.ViTConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise VitslimError(f"not a valid ViT config ({error}); check config.json") from None


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json describes a transformers ViT (timm folders have no model_type)."""

    if not (path / CONFIG_FILE).is_file():
        return False
    config = read_json(path / CONFIG_FILE, "model folder")
    return config.get("model_type") == MODEL_TYPE or CLASS_NAME in (config.get("architectures") or [])


def load_hf_folder(path: Path) -> nn.Module:
    """Build the model from config.json and load model.safetensors strictly, without pickle.

    Weights go through ``from_pretrained(None, state_dict=...)`` rather than ``load_state_dict``
    so that transformers renames checkpoints saved in another version's layout (5.x still writes
    the 4.x names); the tensors themselves were read by safetensors, so no file is unpickled.
    """
    config_data = read_json(path / CONFIG_FILE, "Hugging Face model folder")
    architectures = config_data.get("architectures") or [CLASS_NAME]
    if CLASS_NAME not in architectures:
        raise VitslimError(f"{path} holds a {', '.join(architectures)}; vitslim supports only {CLASS_NAME} (a ViT with a classifier head)")
    _refuse_pickle(path)
    state = load_weights(path / WEIGHTS_FILE)
    model = _load_state(config_data, state, path / WEIGHTS_FILE)
    if (path / PROCESSOR_FILE).is_file():
        setattr(model, PREPROCESSING_ATTR, read_preprocessing(path / PROCESSOR_FILE, int(model.config.num_channels)))
    return model


def _refuse_pickle(path: Path) -> None:
    if (path / WEIGHTS_FILE).is_file() or not (path / PICKLE_FILE).is_file():
        return
    raise VitslimError(
        f"{path} holds only {PICKLE_FILE}, a pickle checkpoint, which vitslim refuses to load because unpickling can run "
        f"arbitrary code; convert it once where you trust it: ViTForImageClassification.from_pretrained(dir)"
        f".save_pretrained(dir, safe_serialization=True) writes {WEIGHTS_FILE}"
    )


def _load_state(config_data: dict, state: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """The loaded model, in float32 like build(): a half-precision checkpoint is upcast for the compression maths."""
    transformers = _import_transformers()
    config = _config(transformers, config_data)
    with _quiet(transformers):
        model, info = transformers.ViTForImageClassification.from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True
        )
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        # (name, checkpoint shape, model shape)
        "wrong shape": sorted(f"{name} {tuple(saved)} vs {tuple(wanted)}" for name, saved, wanted in info["mismatched_keys"]),
        "error": list(info.get("error_msgs", [])),
    }
    found = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in problems.items() if items]
    if found:
        raise VitslimError(f"checkpoint {source} does not match its config.json: {'; '.join(found)}")
    return model.float().eval()


@contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """Silence the progress bar and load report: vitslim raises its own error when loading fails."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _size(value, what: str, source: Path) -> tuple[int, int]:
    """An image processor size: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"]), int(value["shortest_edge"])
    raise VitslimError(f"{source}: cannot read {what} {value!r}; expected an int, height/width or shortest_edge")


def read_preprocessing(source: Path, channels: int) -> Preprocessing:
    """Translate a transformers image processor config into timm's transform vocabulary.

    A {"height", "width"} resize ignores the aspect ratio, which timm calls the "squash" crop
    mode; a {"shortest_edge"} resize keeps it, timm's "center" mode.
    """

    config = read_json(source, "image processor config")
    resize = config.get("size", {"height": 224, "width": 224})
    size = _size(resize, "size", source)
    crop = _size(config["crop_size"], "crop_size", source) if config.get("do_center_crop") and "crop_size" in config else size
    resample = config.get("resample", 2)
    if resample not in _RESAMPLE:
        raise VitslimError(f"{source}: unknown resample code {resample!r}; expected one of {sorted(_RESAMPLE)}")
    return Preprocessing(
        input_size=(channels, *crop),
        mean=tuple(float(v) for v in config.get("image_mean", (0.5,) * channels)),
        std=tuple(float(v) for v in config.get("image_std", (0.5,) * channels)),
        interpolation=_RESAMPLE[resample],
        crop_pct=crop[0] / size[0],
        crop_mode="center" if isinstance(resize, dict) and "shortest_edge" in resize else "squash",
    )


def prepare_for_replacement(model: nn.Module) -> None:
    """Nothing to switch off: transformers' ViT layers always call their Linear modules."""


def add_attention_bias(attention: AttentionSpec, args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """transformers 5's ``ViTAttention.forward(hidden_states, attention_mask=None)`` adds
    ``attention_mask`` to the attention logits (eager) or hands it to SDPA; ``ViTLayer`` passes it
    positionally. transformers 4's ViT attention takes no mask at all.

    Eagerly the incoming mask is None; while tracing (ONNX export) transformers builds an
    explicit one for the unmerged sequence. ViT takes no padding mask, so every row and column of
    that mask is alike and its leading block stands for the merged sequence."""
    if "attention_mask" not in inspect.signature(attention.module.forward).parameters:
        raise VitslimError(
            "this transformers version's ViT attention takes no attention mask, which token merging needs for "
            "proportional attention; upgrade to transformers 5"
        )

    tokens = bias.shape[-1]

    def with_bias(mask):
        return add_bias(None if mask is None else mask[..., :tokens, :tokens], bias)

    if len(args) > 1:
        return (args[0], with_bias(args[1]), *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": with_bias(kwargs.get("attention_mask"))}


def resize_attention(attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
    """Set the per-head width after the q/k/v/o projections were cut to ``head_dim``.

    transformers 5's ``ViTAttention`` reshapes by ``head_dim`` and scales logits by ``scaling``;
    4.x's ``ViTSelfAttention`` (inside ``ViTAttention.attention``) reshapes by
    ``attention_head_size`` and ``all_head_size`` and, depending on the release, scales by
    ``scaling`` or by ``attention_head_size`` directly.
    """
    module = attention.module
    inner = getattr(module, "attention", None)
    if hasattr(module, "head_dim") and hasattr(module, "scaling"):
        target, current = module, module.head_dim
    elif inner is not None and hasattr(inner, "attention_head_size"):
        target, current = inner, inner.attention_head_size
    else:
        raise VitslimError(f"{type(module).__name__} keeps its head width in attributes vitslim does not know; this transformers version cannot be channel-pruned")
    if current != original_head_dim:
        raise VitslimError(f"Hugging Face attention has head width {current}, not the {original_head_dim} expected; the model and its recipe disagree")
    if target is module:
        module.head_dim = head_dim
    else:
        inner.attention_head_size = head_dim
        inner.all_head_size = attention.num_heads * head_dim
    if hasattr(target, "scaling"):
        target.scaling = head_dim**-0.5


def channel_pruning_obstacles(block: BlockSpec) -> dict[str, str]:
    """None: ViT attention has no norm over the head width and the MLP none over its hidden units."""
    return {}


def pin_architecture(model: nn.Module) -> None:
    """Nothing to pin: ``architecture`` is the config, which slicing channels leaves as it was."""
