"""Every model family through the same public path: describe, evaluate, save, reload."""

import json

import pytest
import torch
from plain_vit import PlainViT, tiny_hf_vit, write_random_images

import vitslim
from vitslim.apps.cli import main
from vitslim.errors import VitslimError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("images"), per_class=3, size=48, suffix=".jpg")


def _logits(model):
    with torch.no_grad():
        return vitslim.describe(model).output(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


def test_hf_vit_saves_reloads_and_evaluates(tmp_path, images):
    model = tiny_hf_vit(num_labels=3)
    folder = vitslim.save(model, tmp_path / "hf-out")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vit"  # HF can read it too
    reloaded = vitslim.load_model(folder)
    assert torch.equal(_logits(model), _logits(reloaded))
    result = vitslim.evaluate(reloaded, images, progress=False)
    assert result["images"] == 9 and result["params"] == sum(p.numel() for p in model.parameters())


def test_hf_folder_through_the_cli(tmp_path, images, capsys):
    model = tiny_hf_vit(num_labels=3)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["eval", str(tmp_path / "hf"), "--data", str(images), "--teacher", str(tmp_path / "hf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 9 and result["agreement"] == 1.0


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_plain_torch_vit_round_trip_needs_its_skeleton(tmp_path, images, batch_first, norm_first):
    torch.manual_seed(0)
    model = PlainViT(num_classes=3, batch_first=batch_first, norm_first=norm_first).eval()
    folder = vitslim.save(model, tmp_path / "plain")
    with pytest.raises(VitslimError, match="skeleton"):
        vitslim.load_model(folder)
    torch.manual_seed(1)
    skeleton = PlainViT(num_classes=3, batch_first=batch_first, norm_first=norm_first)
    reloaded = vitslim.load_model(folder, skeleton=skeleton)
    assert torch.equal(_logits(model), _logits(reloaded))
    result = vitslim.evaluate(model, images, teacher=reloaded, progress=False)
    assert result["images"] == 9 and result["agreement"] == 1.0


def test_plain_skeleton_of_another_shape_is_refused(tmp_path):
    folder = vitslim.save(PlainViT(num_classes=3).eval(), tmp_path / "plain")
    with pytest.raises(VitslimError, match="does not match"):
        vitslim.load_model(folder, skeleton=PlainViT(num_classes=3, dim=64))


def test_hf_folder_compress_eval_bench_through_the_cli(tmp_path, images, capsys):
    torch.manual_seed(0)
    tiny_hf_vit(num_labels=3).save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = tmp_path / "hf-small"
    assert main(["compress", str(tmp_path / "hf"), "--data", str(images), "--param-ratio", "0.6", "--calib-images", "9", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(images), "--teacher", str(tmp_path / "hf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    original = sum(p.numel() for p in vitslim.load_model(tmp_path / "hf").parameters())
    assert result["images"] == 9 and result["params"] <= int(0.6 * original)
    assert main(["bench", str(tmp_path / "hf"), str(out), "--batch-size", "2", "--runs", "20", "--warmup", "1", "--json"]) == 0
    speeds = json.loads(capsys.readouterr().out)
    assert [s["params"] for s in speeds] == [original, result["params"]]


def test_plain_torch_vit_compress_eval_bench_in_python(tmp_path, images):
    torch.manual_seed(0)
    model = PlainViT(num_classes=3).eval()
    spec = vitslim.describe(model)
    from vitslim.io import image_batches, image_dataset, image_sources

    dataset = image_sources.open_images(images, image_dataset.build_transform(spec.preprocessing))
    batches = [batch for batch, _, _ in image_batches.make_loader(dataset, 4)]
    compressed = vitslim.compress(model, vitslim.LowRank(param_ratio=0.7), batches, calib_images=1, progress=False)
    folder = vitslim.save(compressed, tmp_path / "plain-small")
    reloaded = vitslim.load_model(folder, skeleton=PlainViT(num_classes=3))
    assert torch.equal(_logits(compressed), _logits(reloaded))
    result = vitslim.evaluate(reloaded, images, teacher=model, progress=False)
    assert result["images"] == 9 and result["params"] <= int(0.7 * sum(p.numel() for p in model.parameters()))
    speeds = vitslim.benchmark([("original", model), ("compressed", reloaded)], batch_size=2, runs=20, warmup=1, progress=False)
    assert speeds[1].params == result["params"] and speeds[1].ratio > 0
