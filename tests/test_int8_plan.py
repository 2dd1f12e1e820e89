"""int8 as an axis of the plan (issue #28): Linears kept in float32 (``quantize_int8(keep_float=)``,
``deploy.int8_fallback``), int8 layers as int8 MatMuls in ONNX Runtime (export and bench), and
``lowrank+cait``'s int8 axis: the split's arithmetic under int8, the "int8 alone" outcome, the
runtime the target is measured in, and the planned model from the pipeline to its ONNX file."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import onnx
import pytest
import torch
from conftest import COMPRESSIBLE, outputs, tiny_vit
from plain_vit import write_random_images

import vitslim
from vitslim.deploy.export import INT8_TOLERANCE, compare_onnx, export_checked_onnx, export_onnx, matmuls_of
from vitslim.deploy.int8_fallback import Int8Plan, carried_over, outliers, plan_int8
from vitslim.deploy.quantize import int8_layers, quantize_int8
from vitslim.errors import VitslimError
from vitslim.io.recipe import find_step
from vitslim.lowrank_cait import (
    INT8_LEVEL,
    MEASURABLE_GAIN,
    Probe,
    Target,
    combine,
    probe_axes,
    split_target,
    unmeasurable_under_int8,
)
from vitslim.measure import bench
from vitslim.measure.metrics import count_flops, count_params

TOTAL, FIXED = 1000, 200
KEPT = "blocks.1.mlp.fc2"


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


# --- Linears kept in float32 -------------------------------------------------------------------

def test_keep_float_leaves_the_named_linears_in_float32():
    model = tiny_vit(seed=0)
    quantised = quantize_int8(model, "dynamic", keep_float=[KEPT])
    assert isinstance(quantised.get_submodule(KEPT), torch.nn.Linear)
    assert KEPT not in int8_layers(quantised) and len(int8_layers(quantised)) == len(int8_layers(quantize_int8(model, "dynamic"))) - 1
    assert KEPT not in find_step(quantised, "int8")["modules"]
    with pytest.raises(VitslimError, match="keep_float names blocks.9.mlp.fc2"):
        quantize_int8(model, "dynamic", keep_float=["blocks.9.mlp.fc2"])
    with pytest.raises(VitslimError, match="leaves nothing to quantise"):
        quantize_int8(model, "dynamic", keep_float=list(int8_layers(quantize_int8(model))))


def test_a_kept_linear_survives_save_and_load(tmp_path):
    quantised = quantize_int8(tiny_vit(seed=0), "dynamic", keep_float=[KEPT])
    reloaded = vitslim.load_model(str(vitslim.save(quantised, tmp_path / "m")))
    assert isinstance(reloaded.get_submodule(KEPT), torch.nn.Linear) and int8_layers(reloaded) == int8_layers(quantised)
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(outputs(reloaded, images), outputs(quantised, images))


# --- int8 layers as int8 MatMuls in ONNX Runtime ----------------------------------------------

def test_an_int8_model_exports_exactly_its_int8_layers_as_int8_matmuls(tmp_path):
    model = tiny_vit(seed=0)
    quantised = quantize_int8(model, "dynamic", keep_float=[KEPT])
    path = export_onnx(quantised, tmp_path / "m.onnx", int8="dynamic")
    float_graph = export_onnx(model, tmp_path / "float.onnx")
    assert len(matmuls_of(float_graph, [KEPT])) == 1 and len(matmuls_of(float_graph, ["blocks.0.attn.qkv", KEPT])) == 2
    assert matmuls_of(float_graph, ["head"])  # the head exports as a Gemm, found by its scope too
    assert _ops(path)["MatMulInteger"] == len(int8_layers(quantised))  # every int8 Linear, the head's Gemm too; the kept one stays float
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert compare_onnx(quantised, path, images).relative_error < INT8_TOLERANCE
    # a float model's int8 export quantises every MatMul, as before
    assert _ops(export_onnx(model, tmp_path / "all.onnx", int8="dynamic"))["MatMulInteger"] == len(int8_layers(quantised)) + 1


def test_matmuls_of_refuses_a_file_that_names_none_of_the_layers(tmp_path):
    path = export_onnx(tiny_vit(seed=0), tmp_path / "m.onnx")
    with pytest.raises(VitslimError, match="none of its MatMuls"):
        matmuls_of(path, ["not.a.layer"])


def test_the_checked_export_of_an_int8_model_keeps_its_float_layers_float(tmp_path):
    quantised = quantize_int8(tiny_vit(seed=0), "dynamic", keep_float=[KEPT])
    written = export_checked_onnx(quantised, tmp_path / "m.onnx", torch.randn(4, 3, 32, 32), int8="dynamic")
    assert written.float_check.passed and written.int8.relative_error < INT8_TOLERANCE
    assert _ops(written.path)["MatMulInteger"] == len(int8_layers(quantised))


def test_bench_runs_a_dynamic_int8_model_as_int8_matmuls_in_onnx_runtime(tmp_path):
    model = tiny_vit(seed=0)
    quantised = quantize_int8(model, "dynamic")
    results = vitslim.benchmark([("float", model), ("int8", quantised)], runtime="onnxruntime", onnx_cache=tmp_path, runs=20,
                                batch_size=4, warmup=1, progress=False)
    assert [result.model for result in results] == ["float", "int8"]
    (int8_file,) = tmp_path.glob("*-int8.onnx")
    assert _ops(int8_file)["MatMulInteger"] > 0
    # the cached file is checked and reused on the next run
    vitslim.benchmark([("int8", quantised)], runtime="onnxruntime", onnx_cache=tmp_path, runs=20, batch_size=4, warmup=1, progress=False)
    assert list(tmp_path.glob("*-int8.onnx")) == [int8_file]


# --- which Linears int8 leaves in float32 -----------------------------------------------------

@pytest.mark.parametrize("costs, expected", [
    ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0, "f": 1.0, "g": 1.0, "h": 50.0}, ("h",)),
    ({f"l{i}": 1.0 for i in range(8)}, ()),  # nothing stands out
    ({**{f"l{i}": 1.0 for i in range(16)}, "x": 9.0, "y": 30.0, "z": 3.9}, ("y", "x")),  # most costly first; z is under 4x the median
    ({**{f"l{i}": 1.0 for i in range(16)}, "x": 9.0, "y": 30.0, "z": 5.0}, ("y", "x")),  # 1/8 of 19 layers: z is over the share
    ({**{f"l{i}": 1.0 for i in range(6)}, "x": 9.0, "y": 30.0}, ("y",)),
    ({}, ()),
])
def test_outliers_are_the_layers_far_above_the_median_within_the_share(costs, expected):
    assert outliers(costs) == expected


def _outlier_model():
    """A tiny ViT whose block-1 fc1 writes one huge hidden channel that fc2 then ignores (a zero
    weight column, so the residual stream never sees it): fc2's input spans a range dynamic int8's
    one scale per call cannot resolve, while fc1's own per-row weights quantise fine."""
    model = tiny_vit(seed=0)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0] *= 200
        model.blocks[1].mlp.fc1.bias[0] = 50.0
        model.blocks[1].mlp.fc2.weight[:, 0] = 0
    return model


def test_the_fallback_keeps_the_layer_whose_int8_breaks_the_output_and_lowers_the_objective():
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    plan = plan_int8(_outlier_model(), "dynamic", calibration, progress=False)
    assert plan.keep_float == (KEPT,)
    assert plan.cost < plan.cost_all and max(plan.layer_costs, key=plan.layer_costs.get) == KEPT
    benign = plan_int8(tiny_vit(seed=0), "dynamic", calibration, progress=False)
    assert benign.cost <= benign.cost_all and len(benign.keep_float) <= len(benign.layer_costs) // 8


# --- the split under int8 -----------------------------------------------------------------------

def _probe(axis, level, cost, speedup, int8_speedup=None, params=TOTAL):
    return Probe(axis, level, cost, speedup, 1 / speedup if axis != "int8" else 1.0, params, int8_speedup)


PROBES = [
    _probe("int8", INT8_LEVEL, 0.010, 2.0),
    _probe("tokens", 1.3, 0.008, 1.3, int8_speedup=2.5), _probe("tokens", 1.6, 0.030, 1.6, int8_speedup=3.1),
    _probe("lowrank", 0.6, 0.004, 1.25, int8_speedup=2.04, params=680),  # 1.02x over int8 alone: not measurable
    _probe("lowrank", 0.4, 0.040, 1.6, int8_speedup=2.06, params=520),
]


def _brute_force(probes, target):
    """Every choice of at most one probe per axis, under int8 each structural axis contributing its
    gain over int8 alone, and never one whose gain is below MEASURABLE_GAIN: written apart from
    split_target."""
    best = None
    axes = sorted({p.axis for p in probes})
    for choice in itertools.product(*[[None] + [p for p in probes if p.axis == axis] for axis in axes]):
        chosen = [p for p in choice if p]
        int8 = next((p for p in chosen if p.axis == "int8"), None)
        if int8 and any(p is not int8 and p.int8_speedup / int8.speedup < MEASURABLE_GAIN for p in chosen):
            continue
        speed = 1.0
        for p in chosen:
            speed *= p.speedup if int8 is None or p is int8 else p.int8_speedup / int8.speedup
        if speed < target.speedup:
            continue
        cost = sum(p.cost for p in chosen)
        if best is None or (cost, -speed) < best[0]:
            best = ((cost, -speed), {p.axis: p.level for p in chosen})
    return best


@pytest.mark.parametrize("speedup", [1.2, 1.5, 1.9, 2.4, 2.9])
def test_the_split_under_int8_is_the_cheapest_feasible_combination(speedup):
    split = split_target(PROBES, Target(speedup=speedup), total=TOTAL, fixed=FIXED)
    (cost, _), levels = _brute_force(PROBES, Target(speedup=speedup))
    assert split.cost == pytest.approx(cost)
    assert {axis: level for axis, level in split.levels.items() if level != 1} == levels


def test_int8_alone_wins_where_it_is_cheapest_and_gains_compound_under_int8():
    alone = split_target(PROBES, Target(speedup=1.9), total=TOTAL, fixed=FIXED)
    assert alone.levels == {"channels": 1.0, "lowrank": 1.0, "tokens": 1.0, "int8": INT8_LEVEL} and alone.speedup == 2.0
    composed = split_target(PROBES, Target(speedup=2.4), total=TOTAL, fixed=FIXED)
    assert composed.levels["int8"] == INT8_LEVEL and composed.levels["tokens"] == 1.3
    assert composed.speedup == pytest.approx(2.5)  # int8's 2.0 times tokens' 2.5 / 2.0 under int8, not 2.0 x 1.3
    _, speedup, _, _ = combine([PROBES[0], PROBES[2], PROBES[4]], total=TOTAL, fixed=FIXED)
    assert speedup == pytest.approx(2.0 * (3.1 / 2.0) * (2.06 / 2.0))


def test_an_axis_that_adds_nothing_measurable_under_int8_is_named_and_never_combined_with_it():
    assert unmeasurable_under_int8(PROBES) == {"lowrank": pytest.approx(1.03)}
    for speedup in (1.9, 2.4, 2.9):
        split = split_target(PROBES, Target(speedup=speedup), total=TOTAL, fixed=FIXED)
        assert "int8" not in split.levels or split.levels["lowrank"] == 1.0
    assert unmeasurable_under_int8([p for p in PROBES if p.axis != "int8"]) == {}


# --- lowrank+cait with the int8 axis ----------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("images"), per_class=8, size=36)


@pytest.mark.parametrize("settings, message", [
    (dict(flops_ratio=0.5, int8_axis="dynamic"), "int8_axis needs a speedup target"),
    (dict(speedup=1.5, int8_axis="float16"), "int8_axis is 'float16'"),
    (dict(speedup=1.5, runtime="tensorrt"), "runtime is 'tensorrt'"),
    (dict(speedup=1.5, ladders={"tokens": (1.3,)}), "ladders must give levels for every axis probed: lowrank, tokens"),
])
def test_bad_int8_axis_and_runtime_settings_are_refused(settings, message):
    with pytest.raises(VitslimError, match=message):
        vitslim.LowRankCait(**settings)


def test_the_pipeline_refuses_its_own_int8_beside_a_planned_one(images):
    with pytest.raises(VitslimError, match="int8 is planned by the lowrank\\+cait method"):
        vitslim.compress(tiny_vit(seed=0), vitslim.LowRankCait(speedup=1.5, int8_axis="dynamic"), torch.zeros(1), int8="dynamic")


def test_probes_in_onnx_runtime_time_every_probe_float_and_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path))
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    probes = probe_axes(model, calibration, levels={"tokens": (1.3,)}, runtime="onnxruntime", int8="dynamic", batch_size=8,
                        progress=False)
    assert [(p.axis, p.level) for p in probes] == [("tokens", 1.3), ("int8", INT8_LEVEL)]
    assert all(p.speedup > 0 for p in probes) and probes[0].int8_speedup > 0 and probes[1].int8_speedup is None
    assert probes[1].params == count_params(model) and probes[1].cost > 0
    assert len(list((tmp_path / "onnx").glob("*-int8.onnx"))) == 2  # int8 alone, and the merging probe with int8


def test_the_fallback_carries_over_to_a_changed_model_by_name_and_to_a_factorised_linears_factors():
    names = ["blocks.0.attn.qkv.down", "blocks.0.attn.qkv.up", "blocks.0.attn.qkv_extra", "blocks.1.mlp.fc2", "blocks.1.mlp.fc1"]
    assert carried_over(["blocks.0.attn.qkv", "blocks.1.mlp.fc2"], names) == ("blocks.0.attn.qkv.down", "blocks.0.attn.qkv.up",
                                                                              "blocks.1.mlp.fc2")
    assert carried_over([], names) == ()


def test_every_int8_probe_leaves_the_originals_fallback_in_float32(monkeypatch):
    """The int8 the probes are timed with is the one the plan applies: the Linears the original's
    fallback keeps float stay float in int8 alone and in every probe's int8 (a factorised one's
    factors too), and the int8 probe records them."""
    import vitslim.lowrank_cait as lowrank_cait

    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    monkeypatch.setattr(lowrank_cait, "plan_int8", lambda *args, **kwargs: Int8Plan("dynamic", (KEPT,), 0.0, 0.0, {}))
    timed = {}

    def record(models, **kwargs):
        timed.update(models)
        return [SimpleNamespace(ratio=1.0, flops=1.0, params=count_params(m)) for _, m in models]

    monkeypatch.setattr(bench, "benchmark", record)
    probes = probe_axes(model, calibration, levels={"tokens": (1.3,), "lowrank": (0.5,)}, int8="dynamic", progress=False)
    assert probes[-1].axis == "int8" and probes[-1].keep_float == (KEPT,)
    assert {name for name in timed if "int8" in name} == {"int8", "tokens@1.3+int8", "lowrank@0.5+int8"}
    for name in ("int8", "tokens@1.3+int8"):
        assert KEPT not in int8_layers(timed[name]) and isinstance(timed[name].get_submodule(KEPT), torch.nn.Linear)
        assert len(int8_layers(timed[name])) == len(int8_layers(quantize_int8(model, "dynamic"))) - 1
    factorised = timed["lowrank@0.5+int8"]
    factors = [name for name in dict(factorised.named_modules()) if name.startswith(KEPT + ".")]
    assert factors and not set(factors) & set(int8_layers(factorised)) and int8_layers(factorised)


def _speed_by_flops(models, *, runtime="eager", **_):
    """A stand-in for ``vitslim.benchmark`` whose speed-ups are what FLOPs predict, doubled by
    dynamic int8: the plans below then come out the same on any machine."""
    original = count_flops(models[0][1], (3, 32, 32))
    runtimes_seen.append(runtime)

    def result(name, model):
        flops = count_flops(model, (3, 32, 32))
        gain = 2.0 if "dynamic" in int8_layers(model).values() else 1.0
        return SimpleNamespace(model=name, ratio=gain * original / flops, flops=flops, params=count_params(model), noisy=False,
                               ratio_spread=0.0, runtime=runtime)

    return [result(name, model) for name, model in models]


runtimes_seen: list[str] = []


# int8 of a tiny random model's low-rank factors (whitened, with large entries) moves its logits by more
# than they are apart, so the composed case merges tokens only: its int8 file can be checked
@pytest.mark.parametrize("speedup, axes, alone", [(1.8, ("lowrank", "tokens"), True), (2.4, ("tokens",), False)])
def test_the_plan_chooses_int8_alone_or_composes_and_the_pipeline_applies_it(images, tmp_path, monkeypatch, speedup, axes, alone):
    monkeypatch.setattr(bench, "benchmark", _speed_by_flops)
    runtimes_seen.clear()
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    config = vitslim.LowRankCait(speedup=speedup, int8_axis="dynamic", runtime="compile", probe_images=8, axes=axes,
                                 ladders={"lowrank": (0.5,), "tokens": (1.3,)})
    compressed = vitslim.compress(model, config, vitslim.open_images(images, model=model), calib_images=16, progress=False)
    step = find_step(compressed, "lowrank+cait")
    assert set(runtimes_seen) == {"compile"} and step["runtime"] == "compile"
    assert step["levels"]["int8"] == INT8_LEVEL and step["int8"]["kind"] == "dynamic"
    assert (step["levels"]["lowrank"] == step["levels"]["tokens"] == 1.0) == alone
    assert {probe["axis"] for probe in step["probes"]} == {*axes, "int8"}
    assert step["measured_speedup"] >= speedup * 0.95
    assert config.planned_int8(compressed) == ("dynamic", tuple(step["int8"]["keep_float"]))
    assert int8_layers(compressed) and set(int8_layers(compressed).values()) == {"dynamic"}
    reloaded = vitslim.load_model(str(vitslim.save(compressed, tmp_path / "planned")))
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(reloaded, probe), outputs(compressed, probe))
    if not alone:  # the planned model, merging, factors and int8, as one int8 ONNX file
        written = export_checked_onnx(reloaded, tmp_path / "planned.onnx", probe, int8="dynamic")
        assert written.float_check.passed and written.int8.relative_error < INT8_TOLERANCE
        assert _ops(written.path)["MatMulInteger"] > 0


def test_the_export_command_writes_a_dynamic_int8_model_as_int8_matmuls_unless_told_not_to(tmp_path, capsys):
    from vitslim.apps.cli import main

    folder = vitslim.save(quantize_int8(tiny_vit(seed=0), "dynamic", keep_float=[KEPT]), tmp_path / "int8")
    assert main(["export", str(folder), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "writing them as int8 MatMuls" in capsys.readouterr().out
    assert _ops(tmp_path / "m.onnx")["MatMulInteger"] == len(int8_layers(vitslim.load_model(str(folder))))
    assert main(["export", str(folder), "--onnx", str(tmp_path / "f.onnx"), "--int8", "none"]) == 0
    assert _ops(tmp_path / "f.onnx")["MatMulInteger"] == 0 and "max abs difference" in capsys.readouterr().out


def test_a_model_that_merges_tokens_with_low_rank_factors_and_int8_exports_as_one_checked_int8_file(tmp_path):
    """What a plan with all three builds (merging, factors, int8), exported as one file. Plain SVD
    factors: int8 of a tiny random model's *whitened* factors (large entries in directions its
    calibration hardly used) moves its logits more than they are apart, which says nothing of
    the export."""
    from vitslim.cait.patch import apply_token_merging
    from vitslim.cait.schedule import schedule_for_speedup
    from vitslim.lowrank.compress import SVD, compress_lowrank

    factored = compress_lowrank(tiny_vit(**COMPRESSIBLE), [], SVD(param_ratio=0.5, rank_multiple=4), progress=False)
    merging = apply_token_merging(factored, schedule_for_speedup(vitslim.describe(factored), "atme", 1.3))
    planned = quantize_int8(merging, "dynamic")
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    written = export_checked_onnx(planned, tmp_path / "planned.onnx", images, int8="dynamic")
    assert written.float_check.passed and written.int8.relative_error < INT8_TOLERANCE and written.int8.top1_agreement >= 0.75
    # every factor (down and up of each factorised Linear) is an int8 MatMul
    assert _ops(written.path)["MatMulInteger"] == len(int8_layers(planned))
    assert any(name.endswith(".down") for name in int8_layers(planned))


def test_a_stale_cached_int8_file_is_exported_again(tmp_path):
    from vitslim.measure import runtimes

    quantised, impostor = quantize_int8(tiny_vit(seed=0), "dynamic"), quantize_int8(tiny_vit(seed=1), "dynamic")
    stale = tmp_path / f"{runtimes.onnx_cache_key(quantised)[:32]}-int8.onnx"
    export_onnx(impostor, stale, int8="dynamic")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert compare_onnx(quantised, stale, images).relative_error > INT8_TOLERANCE
    assert runtimes.checked_onnx("mine", quantised, tmp_path, 1e-4) == stale
    assert compare_onnx(quantised, stale, images).relative_error < INT8_TOLERANCE


def test_the_report_of_a_plan_that_probed_int8_and_left_it_out_names_its_probes(images, monkeypatch):
    """int8 timed at no gain (a stand-in timing by FLOPs alone): the split leaves it out, and the
    report lists the chosen probes without it."""
    def by_flops_alone(models, *, runtime="eager", **_):
        original = count_flops(models[0][1], (3, 32, 32))
        return [SimpleNamespace(model=name, ratio=original / count_flops(model, (3, 32, 32)), flops=count_flops(model, (3, 32, 32)),
                                params=count_params(model), noisy=False, ratio_spread=0.0, runtime=runtime) for name, model in models]

    monkeypatch.setattr(bench, "benchmark", by_flops_alone)
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    config = vitslim.LowRankCait(speedup=1.2, int8_axis="dynamic", probe_images=8, axes=("tokens",), ladders={"tokens": (1.3,)})
    compressed = vitslim.compress(model, config, vitslim.open_images(images, model=model), calib_images=16, progress=False)
    step = find_step(compressed, "lowrank+cait")
    assert "int8" not in step["levels"] and any(probe["axis"] == "int8" for probe in step["probes"])
    assert config.planned_int8(compressed) is None and not int8_layers(compressed)
    table, split_line = config.report(model, compressed)[:2]
    assert "tokens" in table and "int8" not in table and split_line.startswith("split:")
