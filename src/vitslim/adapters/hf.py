"""Adapter for Hugging Face ``transformers`` ViTs and DINOv2s, and their folders.

Supported classes: ``ViTForImageClassification`` and ``ViTModel``, ``Dinov2ForImageClassification``
and ``Dinov2Model``, and the same two of DINOv2 with registers. The ``...Model`` classes are
feature extractors: no classifier, their output is the token map (``last_hidden_state``).

transformers renamed the modules in 5.0 (``vit.layers[i].attention.q_proj`` instead of
``vit.encoder.layer[i].attention.attention.query``; DINOv2 kept ``encoder.layer``); both layouts
are read, because the ``hf`` extra accepts transformers 4.40 and later. transformers is imported
only when a model has to be built, so vitslim works without it for the other families.
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
    IMAGENET_PREPROCESSING,
    PREPROCESSING_ATTR,
    AttentionSpec,
    BlockSpec,
    MlpSpec,
    Preprocessing,
    ViTSpec,
    add_bias,
    is_linear,
)

# the rule shared by all families (transformers' ViT calls every Linear it holds), as this family's protocol member
from vitslim.adapters.base import replaceable_linears as replaceable_linears
from vitslim.errors import VitslimError
from vitslim.io.folder_io import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_json

FAMILY = "hf"
PROCESSOR_FILE = "preprocessor_config.json"
PICKLE_FILE = "pytorch_model.bin"
# PIL resampling codes, as image processors store them, in timm's interpolation vocabulary
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class _Kind:
    """One transformers class vitslim compresses."""

    model_type: str  # the config.json ``model_type`` of its checkpoints
    config_class: str
    reads_patch_tokens: bool  # see output_reads_patch_tokens


_KINDS = {
    "ViTForImageClassification": _Kind("vit", "ViTConfig", reads_patch_tokens=False),  # classifies the class token
    "ViTModel": _Kind("vit", "ViTConfig", reads_patch_tokens=True),
    # DINOv2's classifier reads the class token beside the mean of the patch tokens
    "Dinov2ForImageClassification": _Kind("dinov2", "Dinov2Config", reads_patch_tokens=True),
    "Dinov2Model": _Kind("dinov2", "Dinov2Config", reads_patch_tokens=True),
    "Dinov2WithRegistersForImageClassification": _Kind(
        "dinov2_with_registers", "Dinov2WithRegistersConfig", reads_patch_tokens=True
    ),
    "Dinov2WithRegistersModel": _Kind("dinov2_with_registers", "Dinov2WithRegistersConfig", reads_patch_tokens=True),
}
# The class of a recipe written before the class was recorded, and of a ViT folder naming none.
LEGACY_CLASS = "ViTForImageClassification"
# What a folder whose config.json names no architecture holds: what the hub's checkpoints of that type hold.
_DEFAULT_CLASSES = {"vit": LEGACY_CLASS, "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
MODEL_TYPES = tuple(_DEFAULT_CLASSES)


def _classes_of(model_type: object) -> list[str]:
    """The supported classes of checkpoints of ``model_type``, classifier first."""
    return [name for name, kind in _KINDS.items() if kind.model_type == model_type]


# For messages: every supported model type with its classes.
SUPPORTED = ", ".join(f"'{model_type}' ({', '.join(_classes_of(model_type))})" for model_type in MODEL_TYPES)
# Model types whose embeddings interpolate the position embedding to the input size in every
# forward pass, so the patch grid follows the preprocessing, not config.image_size.
_INTERPOLATE_POSITIONS = frozenset({"dinov2", "dinov2_with_registers"})


@dataclass(frozen=True)
class _LayerLayout:
    """Where one transformers version keeps the Linears inside an encoder layer."""

    q: str
    k: str
    v: str
    out: str
    fc1: str
    fc2: str


# Where the encoder layers are: inside the classifiers' base model ("vit", "dinov2", ...) or in
# the base model itself; transformers 5's ViT holds them in ``layers``, 4.x and DINOv2 in ``encoder.layer``.
_LAYER_LISTS = tuple(
    f"{base}{layers}" for base in ("vit.", "dinov2.", "dinov2_with_registers.", "") for layers in ("layers", "encoder.layer")
)
_LAYER_LAYOUTS = (
    _LayerLayout("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    _LayerLayout(  # transformers 4.x ViT
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
    _LayerLayout(  # transformers 4.x DINOv2
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "mlp.fc1",
        "mlp.fc2",
    ),
)


def _has_linears(module: nn.Module, paths: tuple[str, ...]) -> bool:
    try:
        return all(is_linear(module.get_submodule(path)) for path in paths)
    except AttributeError:
        return False


def _layers(model: nn.Module) -> tuple[nn.ModuleList, _LayerLayout]:
    """The encoder layers and the layout of their Linears, or a ``VitslimError`` naming what is missing."""
    for path in _LAYER_LISTS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found):
            break
    else:
        raise VitslimError(
            f"{type(model).__name__} has no encoder layers where transformers keeps them ({', '.join(_LAYER_LISTS)}); "
            "this transformers layout is not supported"
        )
    for layout in _LAYER_LAYOUTS:
        if _has_linears(found[0], (layout.q, layout.k, layout.v, layout.out, layout.fc1, layout.fc2)):
            return found, layout
    raise VitslimError(
        f"the layers of {type(model).__name__} lack the q/k/v/output projections and fc1/fc2 MLP vitslim compresses "
        "(a SwiGLU MLP, DINOv2's use_swiglu_ffn=True, is not supported)"
    )


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
    """Recognise the class by name, so that matching never imports transformers. A supported class
    whose layers vitslim cannot read still matches, so that ``describe`` says why."""
    cls = type(model)
    return cls.__module__.startswith("transformers.") and cls.__name__ in _KINDS


def _pair(value) -> tuple[int, int]:
    """Configs give sizes as an int or an (height, width) pair."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def default_preprocessing(config) -> Preprocessing:
    """What the model's image processor does, at the size its config names.

    ``ViTImageProcessor`` by default squash-resizes to the model size and normalises by 0.5.
    DINOv2's published checkpoints configure theirs (a ``BitImageProcessor``) to resize the short
    side to 256/224 of the crop, crop the centre, and normalise with the ImageNet statistics.
    """
    channels, size = int(config.num_channels), _pair(config.image_size)
    if config.model_type in _INTERPOLATE_POSITIONS:
        return Preprocessing(
            input_size=(channels, *size), mean=IMAGENET_PREPROCESSING.mean, std=IMAGENET_PREPROCESSING.std,
            interpolation="bicubic", crop_pct=224 / 256, crop_mode="center",
        )
    return Preprocessing(
        input_size=(channels, *size),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
    )


def _label_names(config) -> list[str] | None:
    """Real class names, or None when transformers only made up ``LABEL_i`` placeholders."""
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    return None if names == [f"LABEL_{i}" for i in range(config.num_labels)] else names


def _block(index: int, layer: nn.Module, layout: _LayerLayout, num_heads: int) -> BlockSpec:
    q, k, v, out, fc1, fc2 = (
        layer.get_submodule(path) for path in (layout.q, layout.k, layout.v, layout.out, layout.fc1, layout.fc2)
    )
    attention = AttentionSpec(
        module=layer.attention, out_proj=out, num_heads=num_heads, head_dim=q.out_features // num_heads, q=q, k=k, v=v
    )
    return BlockSpec(index, layer, attention, MlpSpec(fc1=fc1, fc2=fc2))


def _input_size(config, preprocessing: Preprocessing) -> tuple[int, int]:
    """The image size the model sees: the preprocessing's. A ViT accepts only its config's size;
    DINOv2 interpolates its position embedding to any size (its config's image_size is the
    pretraining size, 518 for the published checkpoints, which crop 224 for inference)."""
    size = (preprocessing.input_size[1], preprocessing.input_size[2])
    if config.model_type not in _INTERPOLATE_POSITIONS and size != _pair(config.image_size):
        # the forward pass would fail on the first batch with a shape error far from the cause
        expected = _pair(config.image_size)
        raise VitslimError(
            f"the model's config expects {expected[0]}x{expected[1]} images but the preprocessing gives "
            f"{size[0]}x{size[1]}; fix preprocessor_config.json or the preprocessing passed in"
        )
    return size


def describe(model: nn.Module, preprocessing: Preprocessing | None = None, **hints) -> ViTSpec:
    if hints:
        raise VitslimError(f"Hugging Face models describe themselves through their config; unexpected hints {sorted(hints)}")
    layers, layout = _layers(model)
    config = model.config
    preprocessing = preprocessing or getattr(model, PREPROCESSING_ATTR, None) or default_preprocessing(config)
    size, patch_size = _input_size(config, preprocessing), _pair(config.patch_size)
    registers = int(getattr(config, "num_register_tokens", 0))
    # the feature models have no classifier; a classifier built with num_labels=0 has an Identity
    num_classes = int(config.num_labels) if is_linear(getattr(model, "classifier", None)) else 0
    return ViTSpec(
        family=FAMILY,
        model=model,
        blocks=[_block(i, layer, layout, int(config.num_attention_heads)) for i, layer in enumerate(layers)],
        num_prefix_tokens=1 + registers,
        grid_size=(size[0] // patch_size[0], size[1] // patch_size[1]),
        patch_size=patch_size,
        preprocessing=preprocessing,
        embed_dim=int(config.hidden_size),
        num_classes=num_classes,
        label_names=_label_names(config) if num_classes else None,
        prefix_kinds={"class": 1, "register": registers} if registers else {"class": 1},
    )


def output_reads_patch_tokens(model: nn.Module) -> bool:
    """Whether the model's output depends on its patch tokens, so token merging must restore the
    full token map (dense mode) before the tokens leave the ViT.

    ``ViTForImageClassification`` classifies the class token alone. DINOv2's classifiers
    concatenate the class token with the mean of the patch tokens, and the feature models return
    every token. A class vitslim does not know is assumed to read them: restoring is always
    correct, merely slower.
    """
    kind = _KINDS.get(type(model).__name__)
    return kind is None or kind.reads_patch_tokens


def _constructor_options(class_name: str, pooler: bool) -> dict:
    """The constructor arguments beyond the config: ``ViTModel`` is built with or without its
    pooler (a tanh layer on the class token), which its config does not record."""
    return {"add_pooling_layer": pooler} if class_name == "ViTModel" else {}


def architecture(model: nn.Module) -> dict:
    """The class and its config; the config also names the class (``architectures``), as
    ``save_pretrained`` writes it, so that the config.json of a vitslim folder reads in transformers."""
    class_name = type(model).__name__
    config = {**model.config.to_dict(), "architectures": [class_name]}
    options = _constructor_options(class_name, getattr(model, "pooler", None) is not None)
    return {"class": class_name, "config": config, **options}


def build(architecture: dict) -> nn.Module:
    """An untrained model of the recorded shape (float32, eval mode)."""
    transformers = _import_transformers()
    class_name = architecture.get("class", LEGACY_CLASS)
    if class_name not in _KINDS:
        raise VitslimError(
            f"the recipe names Hugging Face class {class_name!r}, which vitslim does not build (supported: {SUPPORTED}); "
            "the vitslim folder is corrupt, or was written by a newer vitslim"
        )
    model_class = _model_class(transformers, class_name)
    options = _constructor_options(class_name, bool(architecture.get("add_pooling_layer", True)))
    return model_class(_config(transformers, class_name, architecture["config"]), **options).eval()


def _model_class(transformers: ModuleType, class_name: str) -> type:
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise VitslimError(f"transformers {transformers.__version__} has no {class_name}; upgrade transformers")
    return model_class


def _config(transformers: ModuleType, class_name: str, data: dict):
    config_class = _KINDS[class_name].config_class
    try:
        return getattr(transformers, config_class).from_dict(data)
    except (TypeError, ValueError) as error:
        raise VitslimError(f"not a valid {config_class} ({error}); check config.json") from None


def _model_type(config: dict) -> object:
    """The config's ``model_type``, or, in a config without one, that of the first class it names that vitslim knows."""
    if "model_type" in config:
        return config["model_type"]
    known = [name for name in config.get("architectures") or [] if name in _KINDS]
    return _KINDS[known[0]].model_type if known else None


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json describes a transformers model vitslim loads (timm folders have no model_type)."""

    if not (path / CONFIG_FILE).is_file():
        return False
    return _model_type(read_json(path / CONFIG_FILE, "model folder")) in MODEL_TYPES


def _folder_class(path: Path, config: dict) -> str:
    """The supported class a folder's config.json names (``architectures``), or that of its
    model type when it names none."""
    model_type = _model_type(config)
    if model_type not in MODEL_TYPES:
        raise VitslimError(
            f"{path} holds a Hugging Face model of type {model_type!r}, which vitslim does not load "
            f"(supported Hugging Face model types: {SUPPORTED})"
        )
    architectures = config.get("architectures") or [_DEFAULT_CLASSES[model_type]]
    supported = _classes_of(model_type)
    known = [name for name in architectures if name in supported]
    if not known:
        raise VitslimError(
            f"{path} holds a {', '.join(architectures)}; for model type {model_type!r} vitslim supports only {' or '.join(supported)}"
        )
    return known[0]


def load_hf_folder(path: Path) -> nn.Module:
    """Build the model from config.json and load model.safetensors strictly, without pickle.

    Weights go through ``from_pretrained(None, state_dict=...)`` rather than ``load_state_dict``
    so that transformers renames checkpoints saved in another version's layout (5.x still writes
    the 4.x names); the tensors themselves were read by safetensors, so no file is unpickled.
    """
    config_data = read_json(path / CONFIG_FILE, "Hugging Face model folder")
    class_name = _folder_class(path, config_data)
    _refuse_pickle(path, class_name)
    state = load_weights(path / WEIGHTS_FILE)
    model = _load_state(class_name, config_data, state, path / WEIGHTS_FILE)
    if (path / PROCESSOR_FILE).is_file():
        setattr(model, PREPROCESSING_ATTR, read_preprocessing(path / PROCESSOR_FILE, int(model.config.num_channels)))
    return model


def _refuse_pickle(path: Path, class_name: str) -> None:
    if (path / WEIGHTS_FILE).is_file() or not (path / PICKLE_FILE).is_file():
        return
    raise VitslimError(
        f"{path} holds only {PICKLE_FILE}, a pickle checkpoint, which vitslim refuses to load because unpickling can run "
        f"arbitrary code; convert it once where you trust it: {class_name}.from_pretrained(dir)"
        f".save_pretrained(dir, safe_serialization=True) writes {WEIGHTS_FILE}"
    )


def _load_state(class_name: str, config_data: dict, state: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """The loaded model, in float32 like build(): a half-precision checkpoint is upcast for the compression maths."""
    transformers = _import_transformers()
    config = _config(transformers, class_name, config_data)
    options = _constructor_options(class_name, any(name.startswith("pooler.") for name in state))
    with _quiet(transformers):
        model, info = _model_class(transformers, class_name).from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True, **options
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
    """Nothing to switch off: transformers' ViT and DINOv2 layers always call their Linear modules."""


def unpack_attention(model: nn.Module, record: bool = True) -> list[str]:
    """Nothing to unpack: transformers' ViT and DINOv2 attention call their q/k/v and output Linears."""
    return []


def add_attention_bias(attention: AttentionSpec, args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """transformers 5's ``ViTAttention.forward(hidden_states, attention_mask=None)`` (and
    ``Dinov2Attention``'s alike) adds ``attention_mask`` to the attention logits (eager) or hands it
    to SDPA; ``ViTLayer`` passes it positionally, ``Dinov2Layer`` by keyword. transformers 4's
    attention takes no mask at all.

    Eagerly the incoming mask is None; while tracing (ONNX export) transformers builds an
    explicit one for the unmerged sequence. These models take no padding mask, so every row and
    column of that mask is alike and its leading block stands for the merged sequence."""
    if "attention_mask" not in inspect.signature(attention.module.forward).parameters:
        raise VitslimError(
            f"this transformers version's {type(attention.module).__name__} takes no attention mask, which token merging "
            "needs for proportional attention; upgrade to transformers 5"
        )

    tokens = bias.shape[-1]

    def with_bias(mask):
        return add_bias(None if mask is None else mask[..., :tokens, :tokens], bias)

    if len(args) > 1:
        return (args[0], with_bias(args[1]), *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": with_bias(kwargs.get("attention_mask"))}


def resize_attention(attention: AttentionSpec, head_dim: int, original_head_dim: int) -> None:
    """Set the per-head width after the q/k/v/o projections were cut to ``head_dim``.

    transformers 5's ``ViTAttention`` and ``Dinov2Attention`` reshape by ``head_dim`` and scale
    logits by ``scaling``; 4.x's ``ViTSelfAttention`` and ``Dinov2SelfAttention`` (inside the
    outer attention's ``attention``) reshape by ``attention_head_size`` and ``all_head_size`` and,
    depending on the release, scale by ``scaling`` or by ``attention_head_size`` directly.
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
    """None: the attention has no norm over the head width and the MLP none over its hidden units.
    DINOv2's LayerScale multiplies the embedding channels after the output projection and fc2,
    which pruning heads' channels or hidden units leaves as they are."""
    return {}


def pin_architecture(model: nn.Module) -> None:
    """Nothing to pin: ``architecture`` is the config, which slicing channels leaves as it was."""
