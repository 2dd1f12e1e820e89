import json

import pytest
import safetensors.torch
import timm
import torch
from conftest import TINY, tiny_vit
from shared_paths import VIT_D6, needs_shared

import vitslim
from vitslim.errors import VitslimError
from vitslim.io.persist import RECIPE_FILE, WEIGHTS_FILE

TEN_CLASSES = dict(TINY, num_classes=10)


def _outputs(model, size=(3, 32, 32)):
    with torch.no_grad():
        return vitslim.describe(model).output(torch.randn(4, *size, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name, extra", [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_base_patch16_reg4_gap_256", {}),
    ("vit_small_patch16_224", {"init_values": 1e-5, "qk_norm": True}),
])
def test_timm_round_trip_is_bit_identical(tmp_path, name, extra):
    model = tiny_vit(name=name, **TEN_CLASSES, **extra)
    folder = vitslim.save(model, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "recipe.json"]
    reloaded = vitslim.load_model(folder)
    assert type(reloaded) is type(model)
    assert torch.equal(_outputs(model), _outputs(reloaded))
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    assert recipe["family"] == "timm" and recipe["steps"] == [] and recipe["versions"]["torch"] == torch.__version__


def test_saved_timm_folder_is_also_a_timm_local_dir(tmp_path):
    model = tiny_vit(seed=None, **TEN_CLASSES)
    folder = vitslim.save(model, tmp_path / "out")
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert torch.equal(_outputs(model), _outputs(by_timm))


def test_save_replaces_previous_output_and_leaves_no_staging(tmp_path):
    first = tiny_vit(seed=None, **TEN_CLASSES)
    second = tiny_vit(seed=None, **TEN_CLASSES)
    vitslim.save(first, tmp_path / "out")
    vitslim.save(second, tmp_path / "out")
    assert torch.equal(_outputs(second), _outputs(vitslim.load_model(tmp_path / "out")))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(VitslimError, match="not an empty folder"):
        vitslim.save(tiny_vit(seed=None, **TEN_CLASSES), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VitslimError, match="cannot write"):
        vitslim.save(tiny_vit(seed=None, **TEN_CLASSES), blocker / "sub" / "out")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        vitslim.save(tiny_vit(seed=None, **TEN_CLASSES), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _timm_folder(tmp_path, **model_args):
    model = tiny_vit(seed=None, **{**TEN_CLASSES, **model_args})
    folder = tmp_path / "timm"
    folder.mkdir()
    args = {k: v for k, v in {**TEN_CLASSES, **model_args}.items() if k != "num_classes"}
    (folder / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224", "num_classes": 10, "model_args": args,
                                                     "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    safetensors.torch.save_file(model.state_dict(), str(folder / WEIGHTS_FILE))
    return model, folder


@pytest.mark.parametrize("prefix", ["local-dir:", ""])
def test_timm_folder_loads_with_or_without_prefix(tmp_path, prefix):
    model, folder = _timm_folder(tmp_path)
    loaded = vitslim.load_model(f"{prefix}{folder}")
    assert torch.equal(_outputs(model), _outputs(loaded))
    assert vitslim.describe(loaded).preprocessing.mean == (0.5, 0.5, 0.5)


def test_missing_weights_corrupt_weights_and_pickles_are_refused(tmp_path):
    _, folder = _timm_folder(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(VitslimError, match="corrupt"):
        vitslim.load_model(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(VitslimError, match="no model.safetensors"):
        vitslim.load_model(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VitslimError, match="pickle"):
        vitslim.load_model(folder)


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    _, folder = _timm_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VitslimError, match="does not match the model architecture.*wrong shape"):
        vitslim.load_model(folder)


def test_corrupt_config_and_recipe(tmp_path):
    _, folder = _timm_folder(tmp_path)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(VitslimError, match="not valid JSON"):
        vitslim.load_model(folder)
    saved = vitslim.save(tiny_vit(seed=None, **TEN_CLASSES), tmp_path / "saved")
    recipe = json.loads((saved / RECIPE_FILE).read_text())
    recipe["steps"] = [{"method": "from-the-future"}]
    (saved / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(VitslimError, match="cannot rebuild"):
        vitslim.load_model(saved)


def test_unknown_names_and_missing_folders():
    with pytest.raises(VitslimError, match="unknown model 'deit_tiny_patch16_22'.*did you mean deit_tiny_patch16_224"):
        vitslim.load_model("deit_tiny_patch16_22")
    with pytest.raises(VitslimError, match="does not exist"):
        vitslim.load_model("./no/such/folder")
    with pytest.raises(VitslimError, match="does not exist"):
        vitslim.load_model("local-dir:no-such-folder")


def test_module_is_returned_as_is():
    model = torch.nn.Linear(2, 2)
    assert vitslim.load_model(model) is model


@needs_shared
def test_reference_model_loads_like_timm_does():
    ours = vitslim.load_model(f"local-dir:{VIT_D6}")
    theirs = timm.create_model(f"local-dir:{VIT_D6}", pretrained=True).eval()
    assert torch.equal(_outputs(ours), _outputs(theirs))
    spec = vitslim.describe(ours)
    assert spec.label_names[:2] == ["airplane", "automobile"] and spec.preprocessing.crop_pct == 1.0


def test_unreachable_hub_with_pretrained_is_a_clear_error(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        raise AssertionError("only the pretrained path is under test")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(VitslimError, match="cannot fetch pretrained weights for 'deit_tiny_patch16_224'.*local folder"):
        vitslim.load_model("deit_tiny_patch16_224", pretrained=True)
