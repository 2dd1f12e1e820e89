"""One pipeline for every method: the registry, per-method CLI options, KD recovery and int8 for
every method, a method added from outside the package, and folders written before the redesign."""

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import tiny_vit
from torch import nn

import vitslim
from vitslim.apps.cli import main
from vitslim.errors import ParameterError, VitslimError
from vitslim.io import recipe
from vitslim.io.recipe import find_step, steps
from vitslim.methods import Inputs, Method, get_method, method_names, register_method, setting, unregister_method

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _images(count: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(count // 4)]


def test_every_shipped_method_is_registered():
    assert {"lowrank", "svd", "asvd", "cait", "lowrank+cait"} <= set(method_names())
    assert get_method("cait").setting("gate_training").cli_flag == "--gate-epochs"
    with pytest.raises(ParameterError, match="method 'nope' is not a vitslim method; choose one of .*lowrank"):
        get_method("nope")


def test_help_for_one_method_lists_only_its_options(capsys):
    code, out, _ = run(capsys, "compress", "m", "--method", "cait", "--help")
    assert code == 0
    assert "--speedup" in out and "--gate-epochs" in out and "--unconstrained" in out
    assert "--param-ratio" not in out and "--rank-multiple" not in out and "--flops-ratio" not in out
    for shared in ("--data", "--recovery-epochs", "--int8", "--calib-images", "--lr", "--device"):
        assert shared in out
    code, out, _ = run(capsys, "compress", "m", "--method=lowrank", "--help")
    assert "--rank-multiple" in out and "--speedup" not in out
    code, out, _ = run(capsys, "compress", "--help")  # no method: one section per method
    assert all(f"--method {name} " in out for name in ("lowrank", "cait", "lowrank+cait"))


@pytest.mark.parametrize("args, message", [
    (["--method", "cait", "--speedup", "1.5", "--param-ratio", "0.5"], "--param-ratio does not apply to --method cait"),
    (["--param-ratio", "0.5", "--speedup", "2", "--gate-epochs", "1"], "--gate-epochs, --speedup do not apply to --method lowrank"),
    (["--method", "cait", "--speedup", "1.5", "--like", "deit_tiny_patch16_224"], "--like does not apply to --method cait"),
    (["--method", "cait", "--speedup", "0.5"], "--speedup must be greater than 1"),
    (["--method", "cait"], "--speedup is needed by the cait method"),
    (["--method", "nope"], "--method 'nope' is not a vitslim method"),
    (["--param-ratio", "0.5", "--recovery-epochs", "1", "--lr", "0"], "--lr (the learning rate) must be above 0"),
    (["--param-ratio", "0.5", "--checkpoints", "ck"], "--checkpoints and --resume belong to training"),
    (["--param-ratio", "0.5", "--recovery-epochs", "1", "--resume"], "--resume needs --checkpoints"),
    (["--param-ratio", "0.5", "--calib-images", "999"], "--calib-images asks for 999 images, more than the 12"),
])
def test_library_errors_reach_the_user_in_flags(capsys, tmp_path, tiny_model_folder, tiny_image_folder, args, message):
    code, out, err = run(capsys, "compress", tiny_model_folder, "--data", tiny_image_folder, "--calib-images", "8", "--out", tmp_path / "o", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_python_errors_name_python_parameters():
    with pytest.raises(ParameterError, match="^speedup must be greater than 1"):
        vitslim.compress(tiny_vit(), "cait", _images(), speedup=0.9)
    with pytest.raises(ParameterError, match="^rank_multiple is not an option of the cait method"):
        vitslim.compress(tiny_vit(), "cait", _images(), speedup=1.5, rank_multiple=8)
    with pytest.raises(ParameterError, match="^Training.lr"):
        vitslim.Training(lr=0)
    with pytest.raises(ParameterError, match="^Training.resume needs Training.checkpoints"):
        vitslim.Training(resume=True)


@pytest.mark.parametrize("method, options", [
    ("lowrank", ["--param-ratio", "0.6"]),
    ("cait", ["--speedup", "1.3", "--plan-only"]),
    ("lowrank+cait", ["--flops-ratio", "0.8", "--param-ratio", "0.7"]),
])
def test_recovery_and_int8_work_for_every_method(capsys, tmp_path, tiny_model_folder, tiny_image_folder, method, options):
    """The pipeline, not the method, runs KD recovery and int8: every method gets both, the
    recovery's checkpoints land in recovery/, and the folder reloads to the same outputs."""
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", tiny_model_folder, "--data", tiny_image_folder, "--method", method, *options, "--calib-images", "8",
                            "--recovery-epochs", "1", "--batch-size", "4", "--checkpoints", tmp_path / "ckpt", "--int8", "--out", out)
    assert code == 0, err
    assert "weights quantised to int8" in stdout and list((tmp_path / "ckpt" / "recovery").glob("epoch-*"))
    reloaded = vitslim.load_model(out)
    kinds = [step["method"] for step in steps(reloaded)]
    assert kinds[-1] == "int8" and len(kinds) >= 2
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = reloaded.state_dict()
    assert any(tensor.dtype == torch.int8 for tensor in state.values())
    again = vitslim.load_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded(images), again(images))


def test_recovery_moves_the_result_towards_the_original():
    original = tiny_vit()
    images = _images(16)
    plain = vitslim.compress(original, "svd", images, param_ratio=0.4, progress=False)
    recovered = vitslim.compress(original, "svd", images, param_ratio=0.4, progress=False,
                                 recovery=vitslim.Training(epochs=4, lr=3e-3, batch_size=4, progress=False))
    from vitslim.measure.objective import mean_divergence

    with torch.no_grad():
        teacher = [original(batch) for batch in images]
    assert mean_divergence(vitslim.describe(recovered), teacher, images) < mean_divergence(vitslim.describe(plain), teacher, images)


def test_int8_keeps_token_merging_and_its_reload(tmp_path):
    """int8 replaces the key projections the merging hooks sit on: the hooks move with them."""
    original = tiny_vit()
    merged = vitslim.compress(original, "cait", _images(), speedup=1.3, measure=False, progress=False)
    quantised = vitslim.quantize_int8(merged)
    assert [step["method"] for step in steps(quantised)] == ["merging", "int8"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from vitslim.cait.patch import token_map

    with torch.no_grad():
        out = quantised(images)
    assert token_map(quantised) is not None and token_map(quantised).merged  # the merge ran in the int8 model
    assert token_map(merged) is None  # and never touched the model it was copied from
    reloaded = vitslim.load_model(vitslim.save(quantised, tmp_path / "q"))
    with torch.no_grad():
        assert torch.allclose(reloaded(images), out, atol=1e-6)
    assert token_map(reloaded).merged


def _scale_head(model: nn.Module, step: dict) -> None:
    model.head.register_forward_hook(lambda module, args, output: output * step["factor"])


@dataclass(frozen=True)
class ScaleHead(Method):
    """A test method: multiply the logits (its ``warm_up`` run is only recorded, to show that any
    ``Training`` field becomes an epoch flag with its own checkpoint folder)."""

    name: ClassVar[str] = "scale-head"
    summary: ClassVar[str] = "a test method"
    needs_images: ClassVar[bool] = False
    calibrates: ClassVar[bool] = False

    factor: float = setting(2.0, "Multiply the logits by F.")
    warm_up: vitslim.Training | None = setting(None, "A training run of E epochs.", flag="--warm-epochs", folder="warm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.factor > 0:
            raise ParameterError("factor", f"must be above 0, got {self.factor:g}")

    def compress(self, model: nn.Module, inputs: Inputs) -> nn.Module:
        compressed = copy.deepcopy(model)
        step = {"method": "scaled-head", "factor": self.factor}
        if self.warm_up is not None:
            step["warm_up"] = {"epochs": self.warm_up.epochs, "checkpoints": str(self.warm_up.checkpoints)}
        _scale_head(compressed, step)
        recipe.record_step(compressed, step)
        return compressed

    def report(self, original: nn.Module, compressed: nn.Module) -> list[str]:
        return ["scaled"]


def test_a_method_added_outside_the_package_runs_everywhere(capsys, tmp_path, tiny_model_folder, tiny_image_folder):
    """Adding a method is its own module plus a test: registering here is the whole change; the
    CLI (options, help, errors), the pipeline (recovery, int8) and save/reload pick it up."""
    recipe.register_step("scaled-head", summary=lambda step: f"head scaled by {step['factor']:g}")(_scale_head)
    register_method(ScaleHead)
    try:
        code, out, _ = run(capsys, "compress", "m", "--method", "scale-head", "--help")
        assert "--factor" in out and "--warm-epochs" in out and "--speedup" not in out
        code, out, err = run(capsys, "compress", tiny_model_folder, "--data", tiny_image_folder, "--method", "scale-head", "--factor", "3",
                             "--warm-epochs", "2", "--checkpoints", tmp_path / "ck", "--out", tmp_path / "scaled")
        assert code == 0 and "scaled" in out, err
        step = find_step(vitslim.load_model(tmp_path / "scaled"), "scaled-head")
        assert step["warm_up"] == {"epochs": 2, "checkpoints": str(tmp_path / "ck" / "warm")}
        code, out, _ = run(capsys, "info", tmp_path / "scaled")
        assert "head scaled by 3" in out
        code, _, err = run(capsys, "compress", tiny_model_folder, "--data", tiny_image_folder, "--method", "scale-head", "--factor", "-1",
                           "--out", tmp_path / "bad")
        assert code == 2 and "--factor must be above 0" in err and not (tmp_path / "bad").exists()
        original, reloaded = vitslim.load_model(tiny_model_folder), vitslim.load_model(tmp_path / "scaled")
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(reloaded(images), 3 * original(images), atol=1e-5)
        quantised = vitslim.compress(original, ScaleHead(factor=2.0), None, int8=True)
        assert [step["method"] for step in steps(quantised)] == ["scaled-head", "int8"]
        assert steps(vitslim.compress(original, "scale-head", None, factor=2.0)) == steps(vitslim.compress(original, ScaleHead()))
    finally:
        unregister_method("scale-head")


@pytest.mark.parametrize("name", ["lowrank-int8", "cait-channels", "composed"])
def test_folders_written_before_the_redesign_still_load(tmp_path, name):
    """Folders written by vitslim 6f08ff6 (the last commit before the pipeline redesign; see
    fixtures/v0.1/README.md) reload to the logits that version computed."""
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    model = vitslim.load_model(folder)
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = torch.tensor(json.loads((folder / "expected_logits.json").read_text()))
    with torch.no_grad():
        assert torch.allclose(model(probe), expected, atol=1e-5)
    assert all(recipe.summarise(step) != step["method"] for step in steps(model))  # every old step has its summary


def test_flags_removed_in_0_2_are_refused(capsys, tmp_path, tiny_model_folder, tiny_image_folder):
    code, _, err = run(capsys, "compress", tiny_model_folder, "--data", tiny_image_folder, "--method", "svd", "--param-ratio", "0.5",
                       "--finetune-epochs", "1", "--out", tmp_path / "o")
    assert code == 2 and "No such option '--finetune-epochs'" in err and "--recovery-epochs" in err and not (tmp_path / "o").exists()


def test_training_is_one_value_with_its_checks():
    training = vitslim.Training(epochs=2, checkpoints="ckpt")
    assert training.within("gates").checkpoints == Path("ckpt") / "gates"
    assert vitslim.Training().within("gates").checkpoints is None
    with pytest.raises(ParameterError, match="Training.epochs"):
        vitslim.Training(epochs=-1)
    with pytest.raises(ParameterError, match="Training.batch_size"):
        vitslim.Training(batch_size=0)


def test_a_method_needing_images_says_so():
    with pytest.raises(VitslimError, match="the lowrank method calibrates on images"):
        vitslim.compress(tiny_vit(), "lowrank", None, param_ratio=0.5)


def test_recipe_accessors():
    model = tiny_vit()
    assert steps(model) == [] and find_step(model, "merging") is None
    recipe.record_step(model, {"method": "int8", "modules": []})
    recipe.update_step(model, "int8", {"note": 1})
    assert find_step(model, "int8") == {"method": "int8", "modules": [], "note": 1}
    recipe.drop_steps(model, "int8")
    assert steps(model) == []
    with pytest.raises(ValueError, match="no rebuild function"):
        recipe.record_step(model, {"method": "never-registered"})

