"""The Hugging Face and plain-PyTorch adapters: structure, hints, and HF folder loading."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from plain_vit import PlainViT, tiny_hf_vit
from torch import nn

from vitslim.adapters import FAMILIES, hf, replaceable_linears, torch_nn
from vitslim.adapters.base import PREPROCESSING_ATTR, ModelFamily, Preprocessing
from vitslim.errors import VitslimError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_linears(spec, expected: set[str], excluded: list[nn.Module]) -> None:
    linears = spec.linears()
    assert set(linears) == expected
    for name, layer in linears.items():
        assert spec.model.get_submodule(name) is layer
    assert not any(layer is other for layer in linears.values() for other in excluded)


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_vit()


def test_hf_describe(hf_model):
    assert hf.matches(hf_model) and not torch_nn.matches(hf_model)
    spec = hf.describe(hf_model)
    assert (spec.family, len(spec.blocks), spec.num_prefix_tokens, spec.prefix_kinds) == ("hf", 2, 1, {"class": 1})
    assert (spec.grid_size, spec.patch_size, spec.embed_dim, spec.num_classes) == ((4, 4), (8, 8), 32, 10)
    assert all(b.attention.layout == "separate" and (b.attention.num_heads, b.attention.head_dim) == (2, 16) for b in spec.blocks)
    block = spec.blocks[1]
    assert block.module is hf_model.vit.layers[1]
    assert (block.attention.q, block.attention.out_proj) == (block.module.attention.q_proj, block.module.attention.o_proj)
    assert (block.mlp.fc1, block.mlp.fc2) == (block.module.mlp.fc1, block.module.mlp.fc2)
    expected = {
        f"vit.layers.{i}.{name}"
        for i in range(2)
        for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    }
    _assert_linears(spec, expected, [hf_model.classifier])
    assert spec.preprocessing == Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0, "squash")
    assert spec.label_names is None
    assert spec.output(IMAGES).shape == (2, 10)


def test_hf_describe_reads_transformers_4_layout(hf_model):
    """transformers 4.x nests the same Linears as vit.encoder.layer[i].attention.attention.query etc."""

    def node(**children) -> nn.Module:
        module = nn.Module()
        for name, child in children.items():
            setattr(module, name, child)
        return module

    layers = nn.ModuleList(
        node(
            attention=node(attention=node(query=new.attention.q_proj, key=new.attention.k_proj, value=new.attention.v_proj), output=node(dense=new.attention.o_proj)),
            intermediate=node(dense=new.mlp.fc1),
            output=node(dense=new.mlp.fc2),
        )
        for new in hf_model.vit.layers
    )
    legacy = node(vit=node(encoder=node(layer=layers)), classifier=hf_model.classifier)
    legacy.config = hf_model.config
    spec = hf.describe(legacy)
    assert [b.attention.q for b in spec.blocks] == [layer.attention.q_proj for layer in hf_model.vit.layers]
    assert "vit.encoder.layer.1.output.dense" in spec.linears() and len(spec.linears()) == 12


def test_hf_label_names_hints_and_preprocessing_precedence():
    model = tiny_hf_vit(num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"})
    assert hf.describe(model).label_names == ["cat", "dog", "owl"]
    with pytest.raises(VitslimError, match="unexpected hints"):
        hf.describe(model, input_size=32)
    attached = Preprocessing((3, 32, 32), (0.1,) * 3, (0.2,) * 3)
    setattr(model, PREPROCESSING_ATTR, attached)
    assert hf.describe(model).preprocessing == attached
    explicit = Preprocessing((3, 32, 32), (0.3,) * 3, (0.4,) * 3)
    assert hf.describe(model, explicit).preprocessing == explicit
    with pytest.raises(VitslimError, match="expects 32x32 images"):
        hf.describe(model, Preprocessing((3, 64, 64), (0.5,) * 3, (0.5,) * 3))


def test_hf_architecture_round_trip(hf_model):
    record = json.loads(json.dumps(hf.architecture(hf_model)))
    rebuilt = hf.build(record)
    assert not rebuilt.training
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in hf_model.state_dict().items()}
    assert hf.describe(rebuilt).num_classes == 10


def test_hf_build_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(VitslimError, match=r"pip install 'vitslim\[hf\]'"):
        hf.build({"config": {}})


def test_hf_folder_round_trip(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert hf.is_hf_folder(tmp_path)
    loaded = hf.load_hf_folder(tmp_path)
    assert not loaded.training and not hasattr(loaded, PREPROCESSING_ATTR)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES).logits, hf_model(IMAGES).logits, rtol=0, atol=0)


def test_hf_folder_with_current_key_names(hf_model, tmp_path):
    """vitslim's own saver writes state_dict() names, which differ from save_pretrained's in 5.x."""
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    safetensors.torch.save_file(hf_model.state_dict(), tmp_path / "model.safetensors")
    loaded = hf.load_hf_folder(tmp_path)
    torch.testing.assert_close(loaded.state_dict(), hf_model.state_dict(), rtol=0, atol=0)


def test_is_hf_folder_rejects_other_folders(tmp_path):
    assert not hf.is_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    assert not hf.is_hf_folder(tmp_path)


def test_hf_folder_refuses_pickle(hf_model, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")

    def never(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(VitslimError, match=r"pickle.*safe_serialization=True"):
        hf.load_hf_folder(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_hf_folder_corrupt_weights(hf_model, tmp_path, damage):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(VitslimError, match="corrupt"):
        hf.load_hf_folder(tmp_path)


def test_hf_folder_checkpoint_of_another_shape(hf_model, tmp_path):
    tiny_hf_vit(hidden_size=48, intermediate_size=96).save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    with pytest.raises(VitslimError, match=r"wrong shape \(e\.g\. .*\(48"):
        hf.load_hf_folder(tmp_path)


def test_hf_folder_missing_and_unexpected_keys(hf_model, tmp_path):
    state = dict(hf_model.state_dict())
    state["extra.weight"] = state.pop("classifier.bias")
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(VitslimError, match=r"1 missing \(e\.g\. classifier\.bias\); 1 unexpected \(e\.g\. extra\.weight\)"):
        hf.load_hf_folder(tmp_path)


def test_hf_folder_other_architecture(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["ViTForMaskedImageModeling"]}))
    with pytest.raises(VitslimError, match="supports only ViTForImageClassification"):
        hf.load_hf_folder(tmp_path)


def test_hf_folder_reads_image_processor(hf_model, tmp_path):
    from transformers import ViTImageProcessor

    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(tmp_path)
    loaded = hf.load_hf_folder(tmp_path)
    expected = Preprocessing((3, 32, 32), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 1.0, "squash")
    assert getattr(loaded, PREPROCESSING_ATTR) == expected
    assert hf.describe(loaded).preprocessing == expected


def test_read_preprocessing_center_crop(tmp_path):
    source = tmp_path / "preprocessor_config.json"
    source.write_text(json.dumps({"size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 0}))
    assert hf.read_preprocessing(source, 3) == Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, "nearest", 0.8, "center")
    source.write_text(json.dumps({"size": 32, "resample": 9}))
    with pytest.raises(VitslimError, match="resample"):
        hf.read_preprocessing(source, 3)


# ---------------------------------------------------------------- plain PyTorch


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_describe_layouts(batch_first, norm_first):
    torch.manual_seed(0)
    model = PlainViT(batch_first=batch_first, norm_first=norm_first).eval()
    assert torch_nn.matches(model) and not hf.matches(model)
    spec = torch_nn.describe(model)
    assert (spec.family, len(spec.blocks), spec.num_prefix_tokens, spec.prefix_kinds) == ("torch", 2, 1, {"class": 1})
    assert (spec.grid_size, spec.patch_size, spec.embed_dim, spec.num_classes) == ((4, 4), (8, 8), 32, 10)
    layers = model.encoder.layers
    for block, layer in zip(spec.blocks, layers):
        attn = block.attention
        assert (attn.layout, attn.packed, attn.out_proj, attn.num_heads, attn.head_dim) == ("packed", layer.self_attn, layer.self_attn.out_proj, 2, 16)
        assert (block.module, block.mlp.fc1, block.mlp.fc2) == (layer, layer.linear1, layer.linear2)
    expected = {f"encoder.layers.{i}.{name}" for i in range(2) for name in ("self_attn.out_proj", "linear1", "linear2")}
    _assert_linears(spec, expected, [model.head, model.patch_embed])
    assert spec.preprocessing.input_size == (3, 32, 32) and spec.preprocessing.mean == (0.485, 0.456, 0.406)
    assert spec.output(IMAGES).shape == (2, 10)


@pytest.mark.parametrize("prefix", [0, 3])
def test_torch_probe_counts_prefix_tokens(prefix):
    model = PlainViT(num_prefix_tokens=prefix, img_size=48).train()
    spec = torch_nn.describe(model)
    assert (spec.num_prefix_tokens, spec.grid_size) == (prefix, (6, 6))
    assert spec.prefix_kinds == ({"class": prefix} if prefix else {})
    assert model.training and model.encoder.training  # the probe restores the mode
    with pytest.raises(VitslimError, match="num_prefix_tokens=1"):
        torch_nn.describe(model, num_prefix_tokens=1)


def test_torch_input_size_hints_and_errors():
    unknown = PlainViT(pos_embed=False)
    with pytest.raises(VitslimError, match="input_size="):
        torch_nn.describe(unknown)
    assert torch_nn.describe(unknown, input_size=(32, 32)).grid_size == (4, 4)
    assert torch_nn.describe(unknown, input_size=64).grid_size == (8, 8)  # no positional embedding: any size runs

    model = PlainViT()
    with pytest.raises(VitslimError, match="fails on a 48x48 image"):
        torch_nn.describe(model, input_size=48)
    with pytest.raises(VitslimError, match="contradicts the preprocessing"):
        torch_nn.describe(model, Preprocessing((3, 64, 64), (0.5,) * 3, (0.5,) * 3), input_size=32)
    assert torch_nn.describe(model, Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3)).preprocessing.mean == (0.5,) * 3


def test_torch_patch_size_hints_and_errors():
    model = PlainViT()
    with pytest.raises(VitslimError, match="contradicts the model's patch convolution"):
        torch_nn.describe(model, patch_size=16)
    model.patch_embed = nn.Conv2d(3, 32, kernel_size=9, stride=8, padding=1)  # 4x4 tokens, but kernel != stride
    with pytest.raises(VitslimError, match="pass patch_size="):
        torch_nn.describe(model)
    assert torch_nn.describe(model, patch_size=8, input_size=32).num_prefix_tokens == 1
    with pytest.raises(VitslimError, match="fewer than the 8x8 patch grid"):
        torch_nn.describe(model, patch_size=4, input_size=32)


def test_torch_separate_qkv_weights_unsupported():
    model = PlainViT()
    model.encoder.layers[1].self_attn = nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)
    with pytest.raises(VitslimError, match="layer 1.*unsupported"):
        torch_nn.describe(model)


def test_torch_architecture_is_informational():
    record = torch_nn.architecture(PlainViT())
    assert record == {"class": "plain_vit.PlainViT"}
    with pytest.raises(VitslimError, match=r"skeleton=MyViT"):
        torch_nn.build(record)


# ---------------------------------------------------------------- every family

PROTOCOL_FUNCTIONS = [name for name, member in vars(ModelFamily).items() if callable(member) and not name.startswith("_")]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.FAMILY)
def test_every_family_provides_the_whole_protocol(family):
    assert isinstance(family, ModelFamily)
    assert isinstance(family.FAMILY, str) and all(callable(getattr(family, name)) for name in PROTOCOL_FUNCTIONS)


def test_a_family_lacking_a_member_is_no_model_family():
    assert "pin_architecture" in PROTOCOL_FUNCTIONS
    complete = {name: getattr(torch_nn, name) for name in PROTOCOL_FUNCTIONS} | {"FAMILY": "torch"}
    assert isinstance(SimpleNamespace(**complete), ModelFamily)
    assert not isinstance(SimpleNamespace(**{k: v for k, v in complete.items() if k != "pin_architecture"}), ModelFamily)


def test_replaceable_linears_keep_a_packed_attention_out_proj_dense_in_any_model():
    model = PlainViT()
    linears = replaceable_linears(model)
    assert linears == torch_nn.replaceable_linears(model)
    assert "head" in linears and any(name.endswith("linear1") for name in linears)
    assert not any(name.endswith("self_attn.out_proj") for name in linears)
    unknown = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))  # of no family: int8 still quantises it
    assert list(replaceable_linears(unknown)) == ["0"]
