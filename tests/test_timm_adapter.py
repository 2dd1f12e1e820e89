import pytest
import timm
import torch

import vitslim
from vitslim.adapters import describe, timm_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "name, kwargs, prefix, kinds",
    [
        ("deit_tiny_patch16_224", {}, 1, {"class": 1}),
        ("deit_tiny_distilled_patch16_224", {}, 2, {"class": 1, "distillation": 1}),
        ("vit_base_patch16_reg4_gap_256", TINY, 4, {"register": 4}),
        ("vit_small_patch16_224", {**TINY, "init_values": 1e-5, "qk_norm": True}, 1, {"class": 1}),
    ],
)
def test_describe_timm_variants(name, kwargs, prefix, kinds):
    model = timm.create_model(name, **kwargs).eval()
    spec = describe(model)
    assert spec.family == "timm"
    assert spec.num_prefix_tokens == prefix and spec.prefix_kinds == kinds
    assert len(spec.blocks) == len(model.blocks)
    attn = spec.blocks[0].attention
    assert attn.layout == "qkv" and attn.qkv is model.blocks[0].attn.qkv and attn.out_proj is model.blocks[0].attn.proj
    assert attn.num_heads * attn.head_dim == model.embed_dim
    assert spec.blocks[-1].mlp.fc2 is model.blocks[-1].mlp.fc2
    size = model.patch_embed.img_size
    assert spec.grid_size == (size[0] // spec.patch_size[0], size[1] // spec.patch_size[1])
    names = list(spec.linears())
    assert len(names) == 4 * len(model.blocks)
    assert "head" not in names and not any(n.startswith("patch_embed") for n in names)
    assert all(model.get_submodule(n) is layer for n, layer in spec.linears().items())
    # the token count the adapter predicts is what the blocks actually see
    seen = {}

    def record(module, args):
        seen["tokens"] = args[0].shape[1]

    model.blocks[0].register_forward_pre_hook(record)
    with torch.no_grad():
        spec.output(torch.zeros(1, *spec.preprocessing.input_size))
    assert seen["tokens"] == spec.num_prefix_tokens + spec.num_patches


def test_layerscale_and_qknorm_survive_architecture_record():
    model = timm.create_model("vit_small_patch16_224", **TINY, init_values=1e-5, qk_norm=True)
    rebuilt = timm_vit.build(timm_vit.architecture(model))
    original = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == original
    assert any(".ls1." in k for k in original) and any("q_norm" in k for k in original)


def test_preprocessing_comes_from_pretrained_cfg():
    spec = describe(timm.create_model("vit_small_patch16_224", **TINY))
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5)
    assert spec.preprocessing.input_size == (3, 32, 32)  # the built size, not the pretrained tag's 224
    spec = describe(timm.create_model("deit_tiny_patch16_224"))
    assert spec.preprocessing.mean == (0.485, 0.456, 0.406) and spec.preprocessing.interpolation == "bicubic"


def test_non_vit_is_a_clear_error():
    with pytest.raises(vitslim.VitslimError, match="not a ViT"):
        describe(torch.nn.Sequential(torch.nn.Linear(3, 3)))
