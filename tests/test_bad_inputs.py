"""Inputs an adversarial user tried: each gets a VitslimError (or a warning) that names the problem
and what to do, instead of a library traceback, a misleading message or silent work."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import tiny_vit
from PIL import Image

import vitslim
from vitslim import progress
from vitslim.data import make_loader, open_images
from vitslim.errors import VitslimError
from vitslim.persist import RECIPE_FILE, WEIGHTS_FILE
from vitslim.train import Training, distill


def _write_images(folder: Path, sizes: dict[str, int]) -> None:
    """Square RGB PNGs, ``name -> side``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, side in sizes.items():
        Image.new("RGB", (side, side), (40, 80, 120)).save(folder / name)


# --- model folders ------------------------------------------------------------------------------


def test_recipe_naming_an_unknown_timm_architecture_is_refused_without_building_it(tmp_path, monkeypatch):
    folder = vitslim.save(tiny_vit(name="vit_tiny_patch16_224"), tmp_path / "saved")
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["architecture"]["architecture"] = "os.system"
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))

    def never(*args, **kwargs):
        raise AssertionError("timm.create_model must not see a name that timm does not register")

    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(VitslimError, match=r"recipe names timm architecture 'os.system', which timm .* does not know: .*corrupt.*newer timm"):
        vitslim.load_model(folder)


@pytest.mark.parametrize("model_type", ["clip", "bert"])
def test_hugging_face_folder_of_an_unsupported_model_type_names_that_type(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["SomeModel"], "hidden_size": 32}))
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(VitslimError) as caught:
        vitslim.load_model(tmp_path)
    message = str(caught.value)
    assert f"Hugging Face model of type '{model_type}', which vitslim does not load" in message
    assert "'vit' (ViTForImageClassification, ViTModel)" in message and "'dinov2' (" in message
    assert "not a timm model folder" not in message


@pytest.mark.parametrize("name, hint", [("no_such_vit", "timm.list_models"), ("vit_tiny_patch16_22", "did you mean vit_tiny_patch16_224")])
def test_timm_folder_naming_an_unknown_architecture_says_the_config_names_it(tmp_path, name, hint):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name, "num_classes": 10}))
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(VitslimError) as caught:
        vitslim.load_model(tmp_path)
    message = str(caught.value)
    assert f"config.json names architecture '{name}', which timm {timm.__version__} does not know" in message
    assert hint in message and "nor an existing folder" not in message


# --- data ---------------------------------------------------------------------------------------


@pytest.fixture
def named_csv(tmp_path: Path) -> Path:
    """A CSV whose label column holds class names, as people write them by hand."""
    _write_images(tmp_path, {"a.png": 4, "b.png": 4, "c.png": 4})
    (tmp_path / "labels.csv").write_text("file,label\na.png,dog\nb.png,cat\nc.png,dog\n")
    return tmp_path / "labels.csv"


def test_csv_class_names_are_indexed_in_sorted_order_without_model_names(named_csv):
    dataset = open_images(named_csv)
    assert dataset.classes == ["cat", "dog"]
    assert [label for _, label in dataset.samples] == [1, 0, 1]


def test_csv_class_names_take_the_model_label_indices(named_csv):
    dataset = open_images(named_csv, class_names=["airplane", "bird", "cat", "deer", "dog"])
    assert dataset.classes == ["airplane", "bird", "cat", "deer", "dog"]
    assert [label for _, label in dataset.samples] == [4, 2, 4]


def test_csv_class_names_missing_from_the_model_names_are_named(named_csv):
    with pytest.raises(VitslimError, match=r"1 class name\(s\) in column 'label' are not among the model's 2 label names \(first: dog\)"):
        open_images(named_csv, class_names=["cat", "bird"])


def test_csv_mixing_indices_and_names_is_refused_without_a_nonexistent_option(named_csv):
    named_csv.write_text("file,label\na.png,1\nb.png,cat\n")
    with pytest.raises(VitslimError, match=r"line 3: label 'cat' in column 'label' is not an integer, but other rows give class indices") as caught:
        open_images(named_csv)
    assert "--label-column" not in str(caught.value)


def test_image_over_the_decompression_bomb_limit_is_skipped_counted_and_warned_once(tmp_path, monkeypatch, caplog):
    # 25 pixels pass; 144 is over the limit (PIL only warns), 400 over twice the limit (PIL raises)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _write_images(tmp_path / "cat", {"small.png": 5, "warned.png": 12, "refused.png": 20})
    dataset = open_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vitslim"), warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        images, labels, skipped = next(iter(make_loader(dataset, batch_size=3)))
        list(make_loader(dataset, batch_size=3))  # a second pass warns no more
    assert skipped == 2 and images.shape == (1, 3, 5, 5) and labels.tolist() == [0]
    assert not [w for w in escaped if issubclass(w.category, Image.DecompressionBombWarning)]
    for name, pixels in (("warned.png", "144 pixels"), ("refused.png", "400 pixels")):
        messages = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(messages) == 1
        assert f"{pixels}, over PIL's decompression-bomb limit of 100" in messages[0]


# --- training -----------------------------------------------------------------------------------


def test_distill_logs_progress_every_few_steps_within_an_epoch(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_ITEMS", 1)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.tensor([0, 1])) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="vitslim"):
        distill(tiny_vit(1, name="vit_tiny_patch16_224"), tiny_vit(0, name="vit_tiny_patch16_224"), batches, Training(epochs=1))
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distilling epoch 1/1: step")]
    assert [message.split(",")[0] for message in steps] == [f"distilling epoch 1/1: step {n}/3" for n in (1, 2, 3)]
    assert all("loss " in m and "images/s" in m and "ETA " in m for m in steps)
