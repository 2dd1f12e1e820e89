"""Plain PyTorch attention compressed: a packed ``nn.MultiheadAttention`` unpacked into a called
``qkv`` Linear and ``out_proj``, then factorised (low-rank), gated and sliced (CDCP) and quantised
(int8), saved, reloaded into its skeleton and exported, on batch-first and sequence-first,
pre-norm and post-norm models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import outputs
from plain_vit import PlainViT
from torch import nn

import vitslim
from vitslim.adapters import describe, family_of
from vitslim.adapters.torch_nn import UNPACK_STEP, UnpackedMultiheadAttention
from vitslim.cait.gates import attach_gates
from vitslim.cait.patch import apply_token_merging
from vitslim.cait.schedule import MergeSchedule
from vitslim.cait.slicing import slice_channels
from vitslim.deploy.quantize import Int8Linear, quantize_int8
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps
from vitslim.lowrank.calibration import collect_grams
from vitslim.lowrank.compress import compressible_linears
from vitslim.lowrank.layers import LowRankLinear
from vitslim.lowrank.whitening import whitened_spectrum
from vitslim.measure.metrics import count_params

LAYOUTS = [pytest.param(batch_first, norm_first, id=f"{'batch' if batch_first else 'sequence'}-first-{'pre' if norm_first else 'post'}-norm")
           for batch_first in (True, False) for norm_first in (True, False)]
SIZE = dict(dim=32, heads=4, mlp_dim=64)


def _model(batch_first: bool, norm_first: bool, depth: int = 2, seed: int = 0) -> PlainViT:
    torch.manual_seed(seed)
    return PlainViT(depth=depth, batch_first=batch_first, norm_first=norm_first, **SIZE).eval()


def _images(count: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.encoder.layers]


@pytest.mark.parametrize("batch_first, norm_first", LAYOUTS)
def test_unpacking_computes_what_the_packed_attention_did(batch_first, norm_first):
    model = _model(batch_first, norm_first)
    images = _images()
    packed = copy.deepcopy(model)
    unpacked = family_of(model).unpack_attention(model)
    assert unpacked == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert all(isinstance(attn, UnpackedMultiheadAttention) for attn in _attention_modules(model))
    assert steps(model) == [{"method": UNPACK_STEP, "modules": unpacked}]
    assert family_of(model).unpack_attention(model) == [] and len(steps(model)) == 1  # already unpacked: nothing more
    spec = describe(model)
    assert all(block.attention.layout == "qkv" and (block.attention.num_heads, block.attention.head_dim) == (4, 8) for block in spec.blocks)
    assert {f"encoder.layers.{i}.self_attn.{name}" for i in range(2) for name in ("qkv", "out_proj")} <= set(compressible_linears(model))
    assert count_params(model) == count_params(packed)
    torch.testing.assert_close(outputs(model, images), outputs(packed, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_are_honoured_as_nn_multihead_attention_takes_them(batch_first):
    """An attention mask (boolean or additive, shared or per head) and a key padding mask give what
    the packed layer gives; what the layer never asks for is refused."""
    layer = _model(batch_first, False).encoder.layers[0]
    reference = copy.deepcopy(layer)
    family_of(layer).unpack_attention(layer, record=False)
    generator = torch.Generator().manual_seed(2)
    tokens, batch = 5, 3
    x = torch.randn(batch, tokens, 32, generator=generator)
    x = x if batch_first else x.transpose(0, 1)
    blocked = torch.rand(tokens, tokens, generator=generator) > 0.7
    blocked.fill_diagonal_(False)  # every query keeps a key
    per_head = torch.randn(batch * 4, tokens, tokens, generator=generator)
    padding = torch.zeros(batch, tokens, dtype=torch.bool)
    padding[0, -2:] = True
    additive_padding = torch.zeros(batch, tokens).masked_fill(padding, float("-inf"))
    # the reference runs on nn.MultiheadAttention's own path: torch's fused encoder kernel returns NaN for per-head masks
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for masks in ({"src_mask": blocked}, {"src_mask": per_head}, {"src_key_padding_mask": padding},
                          {"src_mask": per_head, "src_key_padding_mask": additive_padding}):
                torch.testing.assert_close(layer(x, **masks), reference(x, **masks), rtol=0, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        with pytest.raises(VitslimError, match="need_weights=False"):
            layer.self_attn(x, x, x)
        with pytest.raises(VitslimError, match="self-attention only"):
            layer.self_attn(x, x.clone(), x, need_weights=False)


@pytest.mark.parametrize("batch_first, norm_first", LAYOUTS)
def test_full_rank_factors_of_the_attention_projections_are_exact(batch_first, norm_first):
    """Brute force: qkv and out_proj replaced by their whitened factors at full rank, the model
    computes what the original did."""
    original = _model(batch_first, norm_first)
    images = _images()
    model = copy.deepcopy(original)
    family_of(model).unpack_attention(model)
    projections = {name: layer for name, layer in compressible_linears(model).items() if "self_attn" in name}
    assert len(projections) == 4
    grams = collect_grams(model, projections, [images], progress=False)
    for name, layer in projections.items():
        spectrum = whitened_spectrum(layer.weight.detach(), grams[name].gram)
        factors = spectrum.factors(min(layer.in_features, layer.out_features))
        vitslim.adapters.replace_submodule(model, name, LowRankLinear.from_factors(*factors, layer.bias.detach()))
    assert sum(isinstance(module, LowRankLinear) for module in model.modules()) == 4
    torch.testing.assert_close(outputs(model, images), outputs(original, images), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def half_size():
    """The issue's model: a 6-block post-norm nn.TransformerEncoder ViT, at 50% of its parameters."""
    original = _model(batch_first=True, norm_first=False, depth=6)
    batches = [_images(16, seed) for seed in range(2)]
    return original, batches, vitslim.compress(original, "lowrank", batches, calib_images=32, param_ratio=0.5, progress=False)


def test_half_the_parameters_of_a_post_norm_encoder_is_reachable(half_size, tmp_path):
    original, batches, compressed = half_size
    assert count_params(compressed) <= 0.5 * count_params(original)
    kinds = [step["method"] for step in steps(compressed)]
    assert kinds == [UNPACK_STEP, "lowrank"]
    factorised = steps(compressed)[-1]["ranks"]
    assert any(name.endswith("self_attn.qkv") for name in factorised) and any(name.endswith("self_attn.out_proj") for name in factorised)
    logits = outputs(compressed, batches[0])
    assert torch.isfinite(logits).all()
    agreement = (logits.argmax(1) == outputs(original, batches[0]).argmax(1)).float().mean()
    assert agreement >= 0.5  # a random model; the structure, not the accuracy, is under test here
    folder = vitslim.save(compressed, tmp_path / "half")
    reloaded = vitslim.load_model(folder, skeleton=_model(batch_first=True, norm_first=False, depth=6, seed=5))
    assert torch.equal(outputs(reloaded, batches[1]), outputs(compressed, batches[1]))


@pytest.mark.parametrize("batch_first, norm_first", LAYOUTS)
def test_cdcp_slices_attention_channels_exactly_as_the_gates_mask_them(batch_first, norm_first, tmp_path):
    original = _model(batch_first, norm_first)
    images = _images()
    model = copy.deepcopy(original)
    gates = attach_gates(model)
    assert all(block.attention and block.mlp for block in gates.blocks)
    torch.testing.assert_close(outputs(model, images), outputs(original, images), rtol=0, atol=1e-5)  # every gate open: the original
    with torch.no_grad():
        for key, kept in (("0", [0, 2, 3, 5]), ("1", [1, 6])):
            for kind in ("qk", "v"):
                getattr(gates, kind)[key].fill_(-3.0)[kept if kind == "qk" else kept[:1]] = 3.0
    gated = outputs(model, images)
    result = slice_channels(model)
    assert [result["blocks"][key]["head_dim"] for key in ("0", "1")] == [4, 2]
    attn = model.encoder.layers[0].self_attn
    assert (attn.head_dim, attn.qkv.out_features, attn.out_proj.in_features) == (4, 3 * 4 * 4, 4 * 4)
    torch.testing.assert_close(outputs(model, images), gated, rtol=0, atol=1e-5)
    assert count_params(model) < count_params(original)
    folder = vitslim.save(model, tmp_path / "sliced")
    reloaded = vitslim.load_model(folder, skeleton=_model(batch_first, norm_first, seed=3))
    assert torch.equal(outputs(reloaded, images), outputs(model, images))


def test_int8_quantises_the_attention_projections(half_size, tmp_path):
    _, batches, compressed = half_size
    quantised = quantize_int8(compressed)
    for attn in _attention_modules(quantised):
        for projection in (attn.qkv, attn.out_proj):
            layers = [projection.down, projection.up] if hasattr(projection, "down") else [projection]
            assert all(isinstance(layer, Int8Linear) for layer in layers)
    assert torch.isfinite(outputs(quantised, batches[0])).all()
    folder = vitslim.save(quantised, tmp_path / "int8")
    reloaded = vitslim.load_model(folder, skeleton=_model(batch_first=True, norm_first=False, depth=6, seed=5))
    assert torch.equal(outputs(reloaded, batches[1]), outputs(quantised, batches[1]))


def test_int8_quantises_the_packed_attention_of_a_dense_model():
    """quantize_int8 unpacks a dense model's attention itself (the original stays packed)."""
    model = _model(batch_first=False, norm_first=False)
    quantised = quantize_int8(model)
    assert all(isinstance(attn, nn.MultiheadAttention) for attn in _attention_modules(model))
    assert all(isinstance(attn.qkv, Int8Linear) and isinstance(attn.out_proj, Int8Linear) for attn in _attention_modules(quantised))
    assert [step["method"] for step in steps(quantised)] == [UNPACK_STEP, "int8"]
    images = _images()
    float_logits = outputs(model, images)
    assert (outputs(quantised, images) - float_logits).norm() / float_logits.norm() < 0.03


@pytest.mark.parametrize("kind", ["weight", "dynamic"])
def test_int8_of_a_token_merging_model_reloads_with_its_merging(kind, tmp_path):
    """int8 unpacks the attention of a model that already merges tokens: the steps stay in the order
    they were applied, and each one, replayed, hands the merging hooks on to the modules it puts in place."""
    model = _model(batch_first=True, norm_first=False)
    apply_token_merging(model, MergeSchedule("atme", ((0, 6, 1),)))
    quantised = quantize_int8(model, kind)
    assert [step["method"] for step in steps(quantised)] == ["merging", UNPACK_STEP, "int8"]
    images = _images(4)
    folder = vitslim.save(quantised, tmp_path / "merged-int8")
    reloaded = vitslim.load_model(folder, skeleton=_model(batch_first=True, norm_first=False, seed=3))
    torch.testing.assert_close(outputs(reloaded, images), outputs(quantised, images), rtol=0, atol=0)
    assert not torch.allclose(outputs(quantised, images), outputs(quantize_int8(_model(True, False), kind), images))


@pytest.mark.parametrize("batch_first", [True, False])
def test_onnx_export_of_compressed_and_sliced_attention_matches(batch_first, tmp_path):
    pytest.importorskip("onnxruntime")
    from vitslim.deploy.export import export_onnx, onnx_max_abs_diff

    sliced = _model(batch_first, norm_first=False)
    slice_channels(sliced, masks={"0": {"qk": torch.tensor([True, False] * 4), "v": torch.tensor([False, True] * 4)}})
    compressed = vitslim.compress(sliced, "lowrank", [_images(16)], calib_images=16, param_ratio=0.6, progress=False)
    assert [step["method"] for step in steps(compressed)] == [UNPACK_STEP, "channels", "lowrank"]
    assert any(isinstance(attn.qkv, LowRankLinear) or isinstance(attn.out_proj, LowRankLinear) for attn in _attention_modules(compressed))
    path = export_onnx(compressed, tmp_path / "model.onnx")
    assert onnx_max_abs_diff(compressed, path, _images(4)) < 1e-4


def test_token_merging_runs_through_the_unpacked_attention():
    """The merging hooks (keys from qkv, proportional attention as attn_mask) give what they give
    on the packed attention."""
    packed = _model(batch_first=False, norm_first=True)
    unpacked = copy.deepcopy(packed)
    family_of(unpacked).unpack_attention(unpacked)
    schedule = MergeSchedule("tome", ((0, 4, 1),))
    images = _images(4)
    for model in (packed, unpacked):
        apply_token_merging(model, schedule)
    merged = outputs(packed, images)
    torch.testing.assert_close(outputs(unpacked, images), merged, rtol=0, atol=1e-5)
    family_of(packed).unpack_attention(packed)  # the merging hooks move to the unpacked attention
    torch.testing.assert_close(outputs(packed, images), merged, rtol=0, atol=1e-5)
    assert [step["method"] for step in steps(packed)] == ["merging", UNPACK_STEP]
    foreign = _model(batch_first=False, norm_first=True)
    foreign.encoder.layers[0].self_attn.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(VitslimError, match="forward hooks that vitslim does not own"):
        family_of(foreign).unpack_attention(foreign)



def test_an_attention_that_cannot_be_unpacked_exactly_stays_packed():
    model = _model(batch_first=True, norm_first=True)
    model.encoder.layers[1].self_attn = nn.MultiheadAttention(32, 4, add_zero_attn=True, batch_first=True)
    assert family_of(model).unpack_attention(model) == ["encoder.layers.0.self_attn"]
    assert [block.attention.layout for block in describe(model).blocks] == ["qkv", "packed"]
