"""DINOv2 as a first-class model: Hugging Face ``Dinov2Model`` / ``Dinov2ForImageClassification``
(with and without registers), ``ViTModel``, and timm's DINOv2 ViTs, with and without a classifier.

Every model is a tiny random one: width 32, 2 layers, 28-pixel images cut into 7-pixel patches (a
4x4 grid). Token merging is left to its own tests: how it hands the token map back to a model
whose output reads the patch tokens is another change.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from torch import nn

import vitslim
from vitslim.adapters import hf, timm_vit, torch_nn
from vitslim.adapters.base import IMAGENET_PREPROCESSING, PREPROCESSING_ATTR, Preprocessing
from vitslim.cait.slicing import slice_channels
from vitslim.errors import VitslimError

IMAGES = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
CALIBRATION = [torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
GEOMETRY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)
REGISTERS = 2

# class name: (config class, config arguments beyond GEOMETRY)
HF_MODELS = {
    "Dinov2Model": ("Dinov2Config", {"mlp_ratio": 2}),
    "Dinov2ForImageClassification": ("Dinov2Config", {"mlp_ratio": 2, "num_labels": 3}),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {"mlp_ratio": 2, "num_register_tokens": REGISTERS}),
    "Dinov2WithRegistersForImageClassification": (
        "Dinov2WithRegistersConfig", {"mlp_ratio": 2, "num_register_tokens": REGISTERS, "num_labels": 3}
    ),
    "ViTModel": ("ViTConfig", {"intermediate_size": 64}),
}
TIMM_MODELS = {
    "dinov2": dict(name="vit_small_patch14_dinov2", num_classes=3),
    "dinov2-registers": dict(name="vit_small_patch14_reg4_dinov2", num_classes=3),
    "dinov2-features": dict(name="vit_small_patch14_dinov2", num_classes=0),
    "dinov2-registers-features": dict(name="vit_small_patch14_reg4_dinov2", num_classes=0),
}


def hf_model(class_name: str, seed: int = 0, **overrides) -> nn.Module:
    import transformers

    config_class, arguments = HF_MODELS[class_name]
    config = getattr(transformers, config_class)(**{**GEOMETRY, **arguments, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()


def timm_model(variant: str) -> nn.Module:
    return tiny_vit(img_size=28, patch_size=7, **TIMM_MODELS[variant])


def output(model: nn.Module, images: torch.Tensor = IMAGES) -> torch.Tensor:
    """What the model is for: a timm model's tensor, a classifier's logits, a feature model's token map."""
    with torch.no_grad():
        result = model(images)
    if isinstance(result, torch.Tensor):
        return result
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


# ---------------------------------------------------------------- Hugging Face: describe


@pytest.mark.parametrize("class_name", sorted(HF_MODELS))
def test_hf_describe(class_name):
    model = hf_model(class_name)
    assert hf.matches(model) and not torch_nn.matches(model)
    spec = vitslim.describe(model)
    registers = REGISTERS if "Registers" in class_name else 0
    classes = 3 if class_name.endswith("ForImageClassification") else 0
    assert (spec.family, len(spec.blocks), spec.num_prefix_tokens) == ("hf", 2, 1 + registers)
    assert spec.prefix_kinds == ({"class": 1, "register": registers} if registers else {"class": 1})
    assert (spec.grid_size, spec.patch_size, spec.embed_dim) == ((4, 4), (7, 7), 32)
    assert (spec.num_classes, spec.label_names) == (classes, None)
    assert all((b.attention.layout, b.attention.num_heads, b.attention.head_dim) == ("separate", 2, 16) for b in spec.blocks)
    base = {"Dinov2ForImageClassification": "dinov2.", "Dinov2WithRegistersForImageClassification": "dinov2_with_registers."}
    base = base.get(class_name, "")
    layers = "layers" if class_name == "ViTModel" else "encoder.layer"
    assert set(spec.linears()) == {
        f"{base}{layers}.{i}.{name}"
        for i in range(2)
        for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    }
    if class_name.startswith("Dinov2"):
        # DINOv2's published processor: ImageNet statistics, bicubic, centre crop of 224 out of 256
        expected = Preprocessing((3, 28, 28), IMAGENET_PREPROCESSING.mean, IMAGENET_PREPROCESSING.std, "bicubic", 0.875, "center")
        assert spec.preprocessing == expected
    result = output(model)
    assert result.shape == ((2, 3) if classes else (2, 1 + registers + 16, 32))


def test_hf_describe_reads_the_transformers_4_dinov2_layout():
    """transformers 4.x nests DINOv2's projections as attention.attention.query/key/value and
    attention.output.dense, its MLP as mlp.fc1/fc2 (not ViT's intermediate/output)."""
    model = hf_model("Dinov2ForImageClassification")

    def node(**children) -> nn.Module:
        module = nn.Module()
        for name, child in children.items():
            setattr(module, name, child)
        return module

    layers = nn.ModuleList(
        node(
            attention=node(attention=node(query=new.attention.q_proj, key=new.attention.k_proj, value=new.attention.v_proj),
                           output=node(dense=new.attention.o_proj)),
            mlp=node(fc1=new.mlp.fc1, fc2=new.mlp.fc2),
        )
        for new in model.dinov2.encoder.layer
    )
    legacy = node(dinov2=node(encoder=node(layer=layers)), classifier=model.classifier)
    legacy.config = model.config
    spec = hf.describe(legacy)
    assert [b.attention.q for b in spec.blocks] == [layer.attention.q_proj for layer in model.dinov2.encoder.layer]
    assert "dinov2.encoder.layer.1.attention.output.dense" in spec.linears() and len(spec.linears()) == 12
    assert spec.num_classes == 3


def test_hf_dinov2_grid_follows_the_preprocessing_not_the_config():
    """DINOv2's config names its pretraining size (518 for the published checkpoints) and its
    position embedding is interpolated to whatever size the processor crops (224)."""
    model = hf_model("Dinov2ForImageClassification", image_size=56)
    assert vitslim.describe(model).grid_size == (8, 8)
    setattr(model, PREPROCESSING_ATTR, Preprocessing((3, 28, 28), IMAGENET_PREPROCESSING.mean, IMAGENET_PREPROCESSING.std))
    spec = vitslim.describe(model)
    assert spec.grid_size == (4, 4) and spec.num_patches == 16
    assert output(model).shape == (2, 3)  # the model does run at that size


def test_hf_swiglu_dinov2_is_refused_by_name():
    model = hf_model("Dinov2Model", use_swiglu_ffn=True)
    assert hf.matches(model)
    with pytest.raises(VitslimError, match="SwiGLU"):
        vitslim.describe(model)


def test_output_reads_patch_tokens():
    from transformers import ViTConfig, ViTForImageClassification

    for class_name in HF_MODELS:  # DINOv2's classifiers average the patch tokens; feature models return them
        assert hf.output_reads_patch_tokens(hf_model(class_name)), class_name
    vit_classifier = ViTForImageClassification(ViTConfig(**GEOMETRY, intermediate_size=64)).eval()
    assert not hf.output_reads_patch_tokens(vit_classifier)
    for variant in TIMM_MODELS:  # DINOv2 pools the class token, with or without a classifier
        assert not timm_vit.output_reads_patch_tokens(timm_model(variant)), variant
    assert timm_vit.output_reads_patch_tokens(tiny_vit(img_size=28, patch_size=7, global_pool="avg"))
    assert timm_vit.output_reads_patch_tokens(tiny_vit(img_size=28, patch_size=7, num_classes=0, global_pool=""))


def test_torch_nn_output_reads_patch_tokens_is_measured():
    from plain_vit import PlainViT

    torch.manual_seed(0)
    class_token_head = PlainViT(num_classes=3).eval()
    assert not torch_nn.output_reads_patch_tokens(class_token_head)
    assert torch_nn.output_reads_patch_tokens(PlainViT(num_classes=3, num_prefix_tokens=0).eval())  # mean pooling
    assert torch_nn.output_reads_patch_tokens(PlainViT(num_classes=3, pos_embed=False))  # input size unknown: the safe answer
    training = PlainViT(num_classes=3).train()
    torch_nn.output_reads_patch_tokens(training)
    assert all(module.training for module in training.modules())  # the probe ran in eval mode and put it back


# ---------------------------------------------------------------- Hugging Face: attention bias and channels


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hf_dinov2_attention_bias(attention):
    """Token merging's additive bias reaches DINOv2's attention logits: zero changes nothing, -inf
    on one key removes it from every query's view."""
    model = hf_model("Dinov2WithRegistersForImageClassification")
    model.config._attn_implementation = attention
    spec = vitslim.describe(model)
    before = output(model)
    tokens = spec.num_prefix_tokens + spec.num_patches

    def with_bias(bias: torch.Tensor) -> torch.Tensor:
        def hook(module, args, kwargs):
            attention_spec = next(b.attention for b in spec.blocks if b.attention.module is module)
            return hf.add_attention_bias(attention_spec, args, kwargs, bias)

        handles = [b.attention.module.register_forward_pre_hook(hook, with_kwargs=True) for b in spec.blocks]
        try:
            return output(model)
        finally:
            for handle in handles:
                handle.remove()

    torch.testing.assert_close(with_bias(torch.zeros(1, 1, tokens, tokens)), before, rtol=0, atol=1e-6)
    masked = torch.zeros(1, 1, tokens, tokens)
    masked[..., 7] = float("-inf")
    assert not torch.allclose(with_bias(masked), before, atol=1e-4)


def test_hf_dinov2_channels_slice_exactly_and_reload(tmp_path):
    """LayerScale is no obstacle: half of each head's channels and of the MLP's hidden units go,
    the sliced model computes what the model with those channels zeroed did, and it reloads."""
    model = hf_model("Dinov2ForImageClassification")
    spec = vitslim.describe(model)
    assert all(hf.channel_pruning_obstacles(block) == {} for block in spec.blocks)
    head_channels = torch.arange(16) % 2 == 0
    hidden_units = torch.arange(64) < 40
    zeroed = hf_model("Dinov2ForImageClassification")
    with torch.no_grad():
        for block in vitslim.describe(zeroed).blocks:
            for layer in (block.attention.q, block.attention.k, block.attention.v):
                layer.weight[~head_channels.repeat(2)] = 0
                layer.bias[~head_channels.repeat(2)] = 0
            block.mlp.fc1.weight[~hidden_units] = 0
            block.mlp.fc1.bias[~hidden_units] = 0
    slice_channels(model, masks={str(i): {"qk": head_channels, "v": head_channels, "mlp": hidden_units} for i in range(2)})
    attention = model.dinov2.encoder.layer[0].attention
    assert (attention.head_dim, attention.scaling, attention.q_proj.out_features) == (8, 8**-0.5, 16)
    torch.testing.assert_close(output(model), output(zeroed), rtol=0, atol=1e-5)
    reloaded = vitslim.load_model(vitslim.save(model, tmp_path / "sliced"))
    assert torch.equal(output(reloaded), output(model))


# ---------------------------------------------------------------- compress, save, reload


def _compress(model: nn.Module, classifier: bool) -> nn.Module:
    # the Fisher sensitivity needs class logits, which a feature model does not have
    return vitslim.compress(model, vitslim.LowRank(param_ratio=0.8, sensitivity=None if classifier else "none"), CALIBRATION, calib_images=1,
                            progress=False)


@pytest.mark.parametrize("class_name", sorted(HF_MODELS))
def test_hf_compress_save_reload(tmp_path, class_name):
    compressed = _compress(hf_model(class_name), class_name.endswith("ForImageClassification"))
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in hf_model(class_name).parameters())
    folder = vitslim.save(compressed, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [class_name]  # transformers reads the folder's config as the right class
    reloaded = vitslim.load_model(folder)
    assert type(reloaded).__name__ == class_name
    torch.testing.assert_close(output(reloaded), output(compressed), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(TIMM_MODELS))
def test_timm_dinov2_describe_compress_save_reload(tmp_path, variant):
    model = timm_model(variant)
    spec = vitslim.describe(model)
    registers = 4 if "registers" in variant else 0
    classes = TIMM_MODELS[variant]["num_classes"]
    assert (spec.family, spec.num_prefix_tokens, spec.grid_size, spec.num_classes) == ("timm", 1 + registers, (4, 4), classes)
    assert spec.prefix_kinds == ({"class": 1, "register": 4} if registers else {"class": 1})
    compressed = _compress(model, bool(classes))
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in model.parameters())
    reloaded = vitslim.load_model(vitslim.save(compressed, tmp_path / "out"))
    assert vitslim.describe(reloaded).num_classes == classes
    torch.testing.assert_close(output(reloaded), output(compressed), rtol=0, atol=1e-5)
    assert output(reloaded).shape == (2, classes or 32)


# ---------------------------------------------------------------- folders transformers writes


@pytest.mark.parametrize("class_name", sorted(HF_MODELS))
def test_hf_save_pretrained_folder_loads(tmp_path, class_name):
    model = hf_model(class_name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = vitslim.load_model(tmp_path)
    assert type(loaded).__name__ == class_name and not loaded.training
    torch.testing.assert_close(output(loaded), output(model), rtol=0, atol=0)


def test_hf_recipe_without_a_class_builds_the_vit_classifier():
    """Recipes written before the class was recorded hold only the config of a ViTForImageClassification."""
    from transformers import ViTConfig

    record = json.loads(json.dumps({"config": ViTConfig(**GEOMETRY, intermediate_size=64, num_labels=3).to_dict()}))
    assert type(hf.build(record)).__name__ == "ViTForImageClassification"
    with pytest.raises(VitslimError, match="names Hugging Face class 'Dinov2Backbone', which vitslim does not build"):
        hf.build({**record, "class": "Dinov2Backbone"})


def test_hf_vit_model_without_pooler_round_trips(tmp_path):
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**GEOMETRY, intermediate_size=64), add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert vitslim.load_model(tmp_path / "hf").pooler is None
    reloaded = vitslim.load_model(vitslim.save(model, tmp_path / "vitslim"))
    assert reloaded.pooler is None
    torch.testing.assert_close(output(reloaded), output(model), rtol=0, atol=0)


def test_hf_dinov2_folder_with_its_processor_config(tmp_path):
    """A folder as the hub holds it: config at the pretraining size, the processor cropping smaller."""
    model = hf_model("Dinov2Model", image_size=56)
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor = {"size": {"shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 28, "width": 28}, "resample": 3,
                 "image_mean": list(IMAGENET_PREPROCESSING.mean), "image_std": list(IMAGENET_PREPROCESSING.std)}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    loaded = vitslim.load_model(tmp_path)
    spec = vitslim.describe(loaded)
    assert spec.grid_size == (4, 4) and spec.preprocessing.input_size == (3, 28, 28) and spec.preprocessing.crop_pct == 28 / 32
    torch.testing.assert_close(output(loaded), output(model), rtol=0, atol=0)
    assert output(loaded).shape == (2, 17, 32)
    with pytest.raises(VitslimError, match="is a Hugging Face folder .*; pass its path without 'local-dir:'"):
        vitslim.load_model(f"local-dir:{tmp_path}")


def test_hf_folder_of_another_dinov2_class_names_the_supported_ones(tmp_path):
    hf_model("Dinov2Model").save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Dinov2Backbone"]}))
    expected = "holds a Dinov2Backbone; for model type 'dinov2' vitslim supports only Dinov2ForImageClassification or Dinov2Model"
    with pytest.raises(VitslimError, match=expected):
        vitslim.load_model(tmp_path)


def test_unsupported_hf_model_type_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(VitslimError) as caught:
        vitslim.load_model(tmp_path)
    message = str(caught.value)
    assert "Hugging Face model of type 'bert', which vitslim does not load" in message
    assert "'dinov2' (Dinov2ForImageClassification, Dinov2Model)" in message
    assert "'vit' (ViTForImageClassification, ViTModel)" in message


def test_timm_feature_folder_written_by_timm_loads(tmp_path):
    """A num_classes=0 DINOv2 in timm's own folder format (as push_to_hf_hub writes it)."""
    from timm.models import save_for_hf

    model = timm_model("dinov2-registers-features")
    geometry = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)
    save_for_hf(model, tmp_path / "timm", model_args=geometry, safe_serialization=True)
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["num_classes"] == 0  # beside the top-level one
    loaded = vitslim.load_model(tmp_path / "timm")
    assert vitslim.describe(loaded).num_classes == 0
    torch.testing.assert_close(output(loaded), output(model), rtol=0, atol=0)
    reloaded = vitslim.load_model(vitslim.save(loaded, tmp_path / "vitslim"))
    torch.testing.assert_close(output(reloaded), output(model), rtol=0, atol=0)


# ---------------------------------------------------------------- token merging keeps the token map


@pytest.mark.parametrize("class_name", ["Dinov2Model", "Dinov2WithRegistersModel", "Dinov2ForImageClassification"])
def test_hf_dinov2_merges_tokens_in_dense_mode_and_keeps_every_shape(tmp_path, class_name):
    """Their outputs read the patch tokens (features, or the patch mean beside the class token), so
    merging restores the full map: last_hidden_state and every hidden state keep their shapes."""
    from vitslim.cait.patch import merges_densely

    model = hf_model(class_name, image_size=56)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(images, output_hidden_states=True)
    merged = vitslim.compress(model, "cait", [images], speedup=1.3, measure=False, progress=False)
    assert merges_densely(merged)
    with torch.no_grad():
        after = merged(images, output_hidden_states=True)
    assert [h.shape for h in after.hidden_states] == [h.shape for h in before.hidden_states]
    assert output(merged, images).shape == output(model, images).shape
    assert not torch.allclose(output(merged, images), output(model, images))
    reloaded = vitslim.load_model(vitslim.save(merged, tmp_path / "merged"))
    torch.testing.assert_close(output(reloaded, images), output(merged, images), atol=1e-5, rtol=1e-5)
