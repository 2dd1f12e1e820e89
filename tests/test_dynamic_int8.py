"""Dynamic int8 (int8 weights, activations quantised at run time, int8 matmuls), beside weight-only
int8: in PyTorch (``quantize_int8(model, "dynamic")``, ``compress --int8 dynamic``) and in ONNX
Runtime (``export_onnx(..., int8="dynamic")``, ``export --int8 dynamic``): agreement with the float
model, the low-rank factors quantised, pickle-free round trips, the exported files' checks, and
refusals of bad input."""

import collections
import copy

import onnx
import pytest
import torch
from conftest import outputs, relative_error, tiny_vit
from torch import nn

import vitslim
from vitslim.apps.cli import main
from vitslim.deploy.export import (
    compare_onnx,
    cpu_flags,
    export_onnx,
    export_program,
    onnx_max_abs_diff,
    onnx_weight_type,
    program_max_abs_diff,
)
from vitslim.deploy.quantize import DynamicInt8Linear, Int8Linear, quantize_int8, weight_only_matmuls
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import steps as recipe_steps
from vitslim.lowrank.compress import SVD, compress_lowrank
from vitslim.lowrank.layers import LowRankLinear
from vitslim.measure.metrics import count_flops, count_params

# 16 patches of 4x4, width 64, depth 4: the Linears hold 96% of the parameters (as in test_quantize)
GEOMETRY = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
# relative logit error ||int8 - float|| / ||float|| on 64 seeded random images (seeds 1-3), measured
# for the low-rank 50% model (svd) below: PyTorch dynamic 0.019-0.034, ONNX Runtime dynamic
# 0.019-0.020 on a VNNI CPU, 0.018 on an AVX2-only one (unsigned weights, export.onnx_weight_type),
# weight-only 0.010. The activations' rounding (one scale per call) carries the extra error.
REL_TOL = 0.05
# share of those images whose arg-max class the int8 model keeps: measured 1.0 for both dynamic
# paths (weight-only: 0.98-1.0)
MIN_AGREEMENT = 0.9


def _images(count=64, size=16, seed=1):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _agreement(output, reference):
    return float((output.argmax(-1) == reference.argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def lowrank():
    # plain SVD needs no calibration images, which keeps this file fast; int8 does not care
    return compress_lowrank(tiny_vit(**GEOMETRY), [], SVD(param_ratio=0.5, rank_multiple=4), progress=False)


@pytest.fixture(scope="module")
def lowrank_dynamic(lowrank):
    return quantize_int8(lowrank, "dynamic")


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_dynamic_layer_stores_what_the_weight_only_layer_stores_and_runs_the_int8_kernel():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    weight_only, dynamic = Int8Linear.from_linear(linear), DynamicInt8Linear.from_linear(linear)
    assert weight_only.state_dict().keys() == dynamic.state_dict().keys()
    assert all(torch.equal(weight_only.state_dict()[key], dynamic.state_dict()[key]) for key in dynamic.state_dict())
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        float_out, weight_out, dynamic_out = linear(x), weight_only(x), dynamic(x)
    # the activations' rounding shows: close to the float layer, but not the weight-only numbers
    assert not torch.equal(dynamic_out, weight_out)
    assert relative_error(dynamic_out, float_out) < REL_TOL
    with weight_only_matmuls(dynamic):
        assert torch.equal(dynamic(x), weight_out)
    assert not torch.equal(dynamic(x), weight_out)  # the kernel is back after the block
    # off the kernel's float32 the layer computes as the weight-only one does
    assert torch.equal(dynamic(x.double()), weight_only(x.double()))


def test_pytorch_dynamic_int8_agrees_with_float_and_quantises_the_low_rank_factors(lowrank, lowrank_dynamic):
    assert _linears(lowrank) and not _linears(lowrank_dynamic)
    assert not any(isinstance(m, Int8Linear) for m in lowrank.modules())  # the input is left untouched
    factorised = [m for m in lowrank_dynamic.modules() if isinstance(m, LowRankLinear)]
    assert factorised and all(isinstance(m.down, DynamicInt8Linear) and isinstance(m.up, DynamicInt8Linear) for m in factorised)
    assert isinstance(lowrank_dynamic.head, DynamicInt8Linear)
    step = recipe_steps(lowrank_dynamic)[-1]
    assert step["method"] == "int8" and step["kind"] == "dynamic" and "blocks.0.mlp.fc1.up" in step["modules"]
    images = _images()
    output, reference = outputs(lowrank_dynamic, images), outputs(lowrank, images)
    assert relative_error(output, reference) < REL_TOL
    assert _agreement(output, reference) >= MIN_AGREEMENT
    assert count_params(lowrank_dynamic) == count_params(lowrank)
    # the int8 kernel's multiply-adds are counted, as a float Linear's are
    assert count_flops(lowrank_dynamic, (3, 16, 16)) == count_flops(lowrank, (3, 16, 16))


def test_dynamic_int8_round_trips_through_safetensors_and_the_recipe(lowrank_dynamic, tmp_path):
    folder = vitslim.save(lowrank_dynamic, tmp_path / "dynamic")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "recipe.json"]
    reloaded = vitslim.load_model(folder)
    images = _images(seed=3)
    assert torch.equal(outputs(reloaded, images), outputs(lowrank_dynamic, images))
    assert isinstance(reloaded.blocks[0].attn.qkv.up, DynamicInt8Linear) and reloaded.blocks[0].attn.qkv.up.weight.dtype == torch.int8
    assert [step["method"] for step in recipe_steps(reloaded)] == ["lowrank", "int8"]
    # a copy packs its own kernel weights and computes the same
    assert torch.equal(outputs(copy.deepcopy(reloaded), images), outputs(reloaded, images))


def test_recipes_without_a_kind_rebuild_weight_only_and_unknown_kinds_are_refused(tmp_path):
    from vitslim.deploy import quantize
    from vitslim.io import recipe

    model = quantize_int8(tiny_vit())
    assert recipe_steps(model)[-1]["kind"] == "weight"
    fresh = tiny_vit()
    quantize._rebuild(fresh, {"method": "int8", "modules": ["head"]})  # as written before dynamic int8 existed
    assert type(fresh.head) is Int8Linear
    with pytest.raises(VitslimError, match="kind 'int4'.*upgrade vitslim"):
        quantize._rebuild(tiny_vit(), {"method": "int8", "kind": "int4", "modules": ["head"]})
    assert recipe.summarise({"method": "int8", "kind": "dynamic", "modules": ["a"]}).startswith("int8 dynamic")


def test_bad_int8_kinds_are_refused_before_any_work():
    with pytest.raises(ParameterError, match="kind must be 'weight'.*or 'dynamic'.*'bogus'"):
        quantize_int8(tiny_vit(), "bogus")
    with pytest.raises(ParameterError, match="^int8 must be 'weight'"):
        vitslim.compress(tiny_vit(), "svd", None, int8="bogus", param_ratio=0.5)
    with pytest.raises(ParameterError, match="int8 must be None or 'dynamic'"):
        export_onnx(tiny_vit(), "unused.onnx", int8="weight")


def test_a_dynamic_model_exports_to_onnx_as_its_dequantised_float_graph(lowrank_dynamic, tmp_path):
    """The int8 kernel cannot be traced, so the exporters capture the weight-only computation,
    and the checks compare against that: exact up to float rounding."""
    images = _images(count=3)
    assert onnx_max_abs_diff(lowrank_dynamic, export_onnx(lowrank_dynamic, tmp_path / "m.onnx"), images) < 1e-4


def test_a_dynamic_model_exports_to_torch_export_as_its_dequantised_float_graph(lowrank_dynamic, tmp_path):
    images = _images(count=3)
    assert program_max_abs_diff(lowrank_dynamic, export_program(lowrank_dynamic, tmp_path / "m.pt2"), images) < 1e-4


def test_onnx_dynamic_int8_quantises_every_linear_and_agrees_with_float(lowrank, tmp_path):
    path = export_onnx(lowrank, tmp_path / "int8.onnx", int8="dynamic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # the float graph was scratch
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    # every Linear, each low-rank factor included, became an int8 matmul with an int8 weight;
    # the float MatMuls left are attention's two (q @ k, attention @ v) per block
    factors = sum(isinstance(m, LowRankLinear) for m in lowrank.modules())
    assert factors and ops["MatMulInteger"] == len(_linears(lowrank)) == 4 * GEOMETRY["depth"] + factors + 1  # + 1: the head
    assert ops["MatMul"] == 2 * GEOMETRY["depth"]
    assert ops["DynamicQuantizeLinear"] >= 1 and "ConvInteger" not in ops
    weights = {init.name: init for init in graph.initializer}
    quantised = [weights[node.input[1]] for node in graph.node if node.op_type == "MatMulInteger"]
    stored = {"QInt8": onnx.TensorProto.INT8, "QUInt8": onnx.TensorProto.UINT8}[onnx_weight_type(cpu_flags())]  # the type for this CPU
    assert all(weight.data_type == stored for weight in quantised)
    # one scale per output channel: the weight's zero point has a value per column
    zero_points = [weights[node.input[3]] for node in graph.node if node.op_type == "MatMulInteger"]
    assert all(list(zero.dims) == [weight.dims[1]] for zero, weight in zip(zero_points, quantised))
    comparison = compare_onnx(lowrank, path, _images())
    assert comparison.relative_error < REL_TOL and comparison.top1_agreement >= MIN_AGREEMENT
    assert 0 < comparison.max_abs_diff < 1


def test_export_command_writes_the_dynamic_int8_file_and_reports_its_agreement(lowrank, tmp_path, capsys):
    folder = vitslim.save(lowrank, tmp_path / "lowrank")
    target = tmp_path / "int8.onnx"
    assert main(["export", str(folder), "--onnx", str(target), "--int8", "dynamic", "--check-images", "16"]) == 0
    out = capsys.readouterr().out
    assert target.is_file() and "relative error" in out and "top-1 agreement" in out and "float graph" in out


def test_export_command_refuses_an_int8_file_beyond_its_tolerance_and_bad_flags(lowrank, tmp_path, capsys):
    folder = vitslim.save(lowrank, tmp_path / "lowrank")
    refused = tmp_path / "refused.onnx"
    assert main(["export", str(folder), "--onnx", str(refused), "--int8", "dynamic", "--int8-tolerance", "1e-9"]) == 2
    assert "error: --int8-tolerance is 1e-09, but the int8 file's output differs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowrank"]  # nothing half-written left
    assert main(["export", str(folder), "--onnx", str(refused), "--int8", "bogus"]) == 2
    assert "'bogus' is not one of 'dynamic', 'none'" in capsys.readouterr().err
    assert main(["export", str(folder), "--torch-export", str(tmp_path / "m.pt2"), "--int8", "dynamic"]) == 2
    assert "give --onnx FILE too" in capsys.readouterr().err


def test_compress_command_int8_kinds(tiny_model_folder, tiny_image_folder, tmp_path, capsys):
    common = ["compress", str(tiny_model_folder), "--data", str(tiny_image_folder), "--method", "svd", "--param-ratio", "0.6", "--calib-images", "8"]
    for flags, kind, layer in ((["--int8"], "weight", Int8Linear), (["--int8", "dynamic"], "dynamic", DynamicInt8Linear)):
        out = tmp_path / kind
        assert main([*common, *flags, "--out", str(out)]) == 0
        assert recipe_steps(vitslim.load_model(out))[-1]["kind"] == kind
        assert type(vitslim.load_model(out).head) is layer
    assert "activations at run time" in capsys.readouterr().out
    assert main([*common, "--int8", "bogus", "--out", str(tmp_path / "bogus")]) == 2
    assert "'bogus' is not one of 'weight', 'dynamic'" in capsys.readouterr().err and not (tmp_path / "bogus").exists()


def test_int8_weights_are_unsigned_only_where_signed_ones_would_saturate():
    from vitslim.deploy.export import ONNX_WEIGHT_TYPE

    assert onnx_weight_type(frozenset({"sse4_2", "avx2", "fma"})) == "QUInt8"  # AVX2 alone: vpmaddubsw saturates
    assert onnx_weight_type(frozenset({"avx2", "avx512f", "avx512_vnni"})) == ONNX_WEIGHT_TYPE == "QInt8"
    assert onnx_weight_type(frozenset({"avx2", "avx_vnni"})) == "QInt8"
    assert onnx_weight_type(None) == "QInt8"  # not x86 Linux: ARM's dot products do not saturate
    assert onnx_weight_type(frozenset({"sse4_2"})) == "QInt8"  # no AVX2: MLAS's SSE kernel widens to int32 first
