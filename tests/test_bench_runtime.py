"""``benchmark`` and ``vitslim bench`` in each runtime: eager, torch.compile and ONNX Runtime (exported,
cached and checked against PyTorch), ratios within a runtime, ONNX files as models, and clear
errors for runtime, device and dtype combinations that cannot be timed."""

import functools
import json

import pytest
import torch
from conftest import tiny_vit

import vitslim
from vitslim.apps.cli import main
from vitslim.deploy import export
from vitslim.deploy.quantize import weight_only_matmuls
from vitslim.errors import VitslimError
from vitslim.measure import runtimes
from vitslim.measure.bench import benchmark
from vitslim.measure.metrics import count_params

FAST = dict(batch_size=2, runs=20, warmup=1, progress=False)


def two_models():
    return [("small", tiny_vit(seed=0)), ("wide", tiny_vit(seed=1, embed_dim=64))]


@pytest.fixture
def counted_exports(monkeypatch):
    """How often bench exported a model to ONNX (the real export still runs)."""
    calls = []
    real_export = export.export_onnx

    def counting_export(model, path, **kwargs):
        calls.append(path)
        return real_export(model, path, **kwargs)

    monkeypatch.setattr(export, "export_onnx", counting_export)
    return calls


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with the aot_eager backend: bench's compile path (called once per model, in
    the mode the docs name, the warm-up compiling) runs through dynamo as it would with inductor,
    without inductor's C++ build, which alone takes 5-15 s for even a tiny model."""
    calls = []
    real_compile = torch.compile

    def compile_without_codegen(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "mode": None, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    return calls


def assert_ratios_to_the_first_per_runtime(results, runtime_names, model_names):
    assert [(r.runtime, r.model) for r in results] == [(rt, m) for rt in runtime_names for m in model_names]
    for name in runtime_names:
        group = [r for r in results if r.runtime == name]
        assert group[0].ratio == 1.0
        for result in group[1:]:
            assert result.ratio == pytest.approx(result.images_per_s / group[0].images_per_s)
        assert all(r.latency_ms > 0 and r.runs == 20 and r.peak_memory_mb > 0 for r in group)


def test_eager_stays_the_default_and_says_so():
    results = benchmark(two_models(), **FAST)
    assert_ratios_to_the_first_per_runtime(results, ["eager"], ["small", "wide"])


def test_onnxruntime_times_the_checked_exports(tmp_path, counted_exports):
    models = two_models()
    results = benchmark(models, runtime="onnxruntime", onnx_cache=tmp_path, **FAST)
    assert_ratios_to_the_first_per_runtime(results, ["onnxruntime"], ["small", "wide"])
    assert [r.params for r in results] == [count_params(m) for _, m in models] and all(r.flops > 0 for r in results)
    assert len(counted_exports) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2


def test_compile_runs_through_torch_compile(quick_compile):
    results = benchmark(two_models(), runtime="compile", **FAST)
    assert_ratios_to_the_first_per_runtime(results, ["compile"], ["small", "wide"])
    assert quick_compile == [{"mode": runtimes.COMPILE_MODE}] * 2


def test_each_compiled_model_has_a_dynamo_cache_of_its_own(quick_compile):
    """Nine models of one class, compiled directly, would share forward's cache and the ninth would
    pass dynamo's recompile limit (8) and run uncompiled; with an entry per model none does."""
    import torch._dynamo

    torch._dynamo.reset()
    models = [runtimes.compiled(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, width))) for width in range(8, 17)]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for model in models:
            model(torch.randn(2, 3, 4, 4))


def test_several_runtimes_in_one_run(tmp_path, quick_compile):
    results = benchmark(two_models(), runtime=["eager", "onnxruntime", "compile"], onnx_cache=tmp_path, **FAST)
    assert_ratios_to_the_first_per_runtime(results, ["eager", "onnxruntime", "compile"], ["small", "wide"])


def test_the_onnx_cache_is_reused_for_the_same_model_and_not_for_changed_weights(tmp_path, counted_exports):
    benchmark([("m", tiny_vit(seed=0))], runtime="onnxruntime", onnx_cache=tmp_path, **FAST)
    benchmark([("same weights, new object", tiny_vit(seed=0))], runtime="onnxruntime", onnx_cache=tmp_path, **FAST)
    assert len(counted_exports) == 1
    benchmark([("other weights", tiny_vit(seed=1))], runtime="onnxruntime", onnx_cache=tmp_path, **FAST)
    assert len(counted_exports) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"


def test_an_export_that_differs_from_pytorch_is_refused_by_name(tmp_path):
    model, impostor = tiny_vit(seed=0), tiny_vit(seed=1)
    vitslim.export_onnx(impostor, tmp_path / f"{runtimes.onnx_cache_key(model)[:32]}.onnx")  # a stale or wrong cached file
    with pytest.raises(VitslimError, match=r"mine: its ONNX export .* differs from PyTorch on 4 random images: max abs difference [0-9.e-]+ \(tolerance 0.0001"):
        benchmark([("mine", model)], runtime="onnxruntime", onnx_cache=tmp_path, **FAST)


def test_the_float64_output_is_the_exact_yardstick():
    model, images = tiny_vit(seed=0), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(export.float64_output(model, images), model(images), atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32  # computed on a copy
    int8 = vitslim.quantize_int8(model, "dynamic")
    with torch.no_grad(), weight_only_matmuls(int8):  # as the exported graph computes an int8 layer
        assert torch.allclose(export.float64_output(int8, images), int8(images), atol=1e-5)


def test_a_model_that_cannot_run_in_float64_has_no_yardstick():
    def float32_only(module, inputs):
        if inputs[0].dtype != torch.float32:
            raise RuntimeError("a float32-only kernel")

    model = tiny_vit(seed=0)
    model.head.register_forward_pre_hook(float32_only)
    assert export.float64_output(model, torch.randn(2, 3, 32, 32)) is None


@pytest.mark.parametrize("onnx_error, accepted", [(0.008, True), (0.05, False)])
@pytest.mark.parametrize("path", ["bench", "export"])
def test_an_export_off_by_float32_rounding_alone_passes_in_bench_and_export(tmp_path, monkeypatch, onnx_error, accepted, path):
    """PyTorch's float32 output is 0.006 from float64 here (an ill-conditioned model): ONNX
    Runtime 0.008 from it is the same function rounded differently, 0.05 is not. bench and
    export decide by the same rule (``export.check_onnx``)."""
    exact = torch.zeros(4, 10)
    reference, exported = exact + 0.006, exact - onnx_error
    monkeypatch.setattr(export, "onnx_and_reference", lambda model, path, images: (exported, reference))
    monkeypatch.setattr(export, "float64_output", lambda model, images: exact)
    model = tiny_vit(seed=0)
    if path == "bench":
        check = lambda: runtimes.checked_onnx("mine", model, tmp_path, 1e-3)  # noqa: E731
    else:
        check = lambda: export.export_checked_onnx(model, tmp_path / "m.onnx", torch.zeros(4, 3, 32, 32), tolerance=1e-3).path  # noqa: E731
    if accepted:
        assert check().is_file()
    else:
        with pytest.raises(VitslimError, match=r"differs from PyTorch.*: max abs difference 0.056 \(tolerance 0.001; PyTorch's float32 "
                                               r"output is 0.006 from float64, ONNX Runtime's 0.05\)"):
            check()
        assert not (tmp_path / "m.onnx").exists()


def test_onnx_sessions_do_not_spin_into_the_next_models_run(tmp_path):
    """Interleaved timing on a few cores: a session whose idle workers spin steals the cores the
    next model (ONNX Runtime's or PyTorch's) is timed on, and skews the ratios."""
    session = runtimes.onnx_session(vitslim.export_onnx(tiny_vit(seed=0), tmp_path / "a.onnx"), threads=2, device=torch.device("cpu"))
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnx_files_are_timed_as_they_are(tmp_path):
    model = tiny_vit(seed=0)
    first, second = vitslim.export_onnx(model, tmp_path / "a.onnx"), vitslim.export_onnx(tiny_vit(seed=1, embed_dim=64), tmp_path / "b.onnx")
    results = benchmark([("a", first), ("b", str(second))], runtime="onnxruntime", **FAST)
    assert_ratios_to_the_first_per_runtime(results, ["onnxruntime"], ["a", "b"])
    assert results[0].flops is None and results[0].params >= count_params(model) * 0.9


def test_bench_cli_times_each_runtime_and_reports_it(capsys, tmp_path, tiny_model_folder):
    folder = str(tiny_model_folder)
    args = ["bench", folder, folder, "--runtime", "eager", "--runtime", "onnxruntime", "--onnx-cache", str(tmp_path),
            "--batch-size", "2", "--warmup", "1"]
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["runtime"] for r in results] == ["eager", "eager", "onnxruntime", "onnxruntime"]
    assert results[0]["ratio"] == 1.0 and results[2]["ratio"] == 1.0
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "runtime" in table and table.count("onnxruntime") == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime": "tensorrt"}, "^runtime is 'tensorrt'; choose from"),
    ({"runtime": []}, "at least one runtime"),
    ({"runtime": "onnxruntime", "dtype": "float16"}, "^dtype must be float32 for the onnxruntime runtime"),
    ({"runtime": "compile", "warmup": 0}, "^warmup must be at least 1 with the compile runtime"),
])
def test_bad_runtime_settings_are_clear_errors(kwargs, message):
    with pytest.raises(VitslimError, match=message):
        benchmark([("m", tiny_vit())], **{**FAST, **kwargs})


def test_an_onnx_file_cannot_be_timed_in_pytorch(tmp_path):
    path = vitslim.export_onnx(tiny_vit(), tmp_path / "m.onnx")
    with pytest.raises(VitslimError, match="^runtime must be 'onnxruntime' alone"):
        benchmark([("m.onnx", path)], runtime=["eager", "onnxruntime"], **FAST)
    with pytest.raises(VitslimError, match="does not exist"):
        benchmark([("gone", tmp_path / "gone.onnx")], runtime="onnxruntime", **FAST)
    (tmp_path / "junk.onnx").write_text("not a graph")
    with pytest.raises(VitslimError, match="not a readable ONNX file"):
        benchmark([("junk", tmp_path / "junk.onnx")], runtime="onnxruntime", **FAST)


def test_onnxruntime_on_cuda_without_its_cuda_provider_is_a_clear_error(monkeypatch):
    """Checked with a pretend CUDA device: the onnxruntime package here has no CUDA provider either way."""
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", functools.partial(list, ["CPUExecutionProvider"]))
    with pytest.raises(VitslimError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        benchmark([("m", tiny_vit())], runtime="onnxruntime", device="cuda", **FAST)


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tensorrt"], "'tensorrt' is not one of"),
    (["--runtime", "onnxruntime", "--dtype", "bfloat16"], "--dtype must be float32 for the onnxruntime runtime"),
    (["--runs", "5"], "--runs must be at least 20"),
])
def test_bad_runtime_flags_exit_with_one_error_line(capsys, tiny_model_folder, args, message):
    code = main(["bench", str(tiny_model_folder), "--batch-size", "2", *args])
    out, err = capsys.readouterr()
    assert code != 0 and out == "" and err.startswith("vitslim: error:") and message in err


def test_the_onnx_cache_tells_a_merging_vit_inside_a_users_model_from_the_plain_one():
    """The merge schedule's recipe step sits on the user's model; the ViT taken out of it merges by
    its hooks alone, and must not reuse the plain ViT's cached graph (it once did: every merged
    backbone of the dense frontier benchmark found the original's file)."""
    from torch import nn

    from vitslim.cait.patch import apply_token_merging
    from vitslim.cait.schedule import plan

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_vit(seed=0, img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=0)

        def forward(self, images):
            return self.backbone.forward_features(images)[:, 1:].mean(1)

    plain, gentle, strong = Wrapped(), Wrapped(), Wrapped()
    apply_token_merging(gentle, plan("atme", (8, 8), 4, 8.0))
    apply_token_merging(strong, plan("atme", (8, 8), 4, 24.0))
    keys = {runtimes.onnx_cache_key(model.backbone) for model in (plain, gentle, strong)}
    assert len(keys) == 3
    assert runtimes.onnx_cache_key(Wrapped().backbone) == runtimes.onnx_cache_key(plain.backbone)  # stable for equal models
