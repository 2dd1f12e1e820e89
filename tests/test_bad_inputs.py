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
from vitslim._infra import progress
from vitslim.errors import VitslimError
from vitslim.io.image_batches import make_loader
from vitslim.io.image_sources import open_images
from vitslim.io.persist import RECIPE_FILE, WEIGHTS_FILE
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


# --- the eight rows of P12: one error line, exit 2, nothing written ------------------------------


def _cli_error(capsys, args: list[str]) -> str:
    """Run the CLI; assert it refused with one ``vitslim: error:`` line and no traceback; return that line."""
    from vitslim.apps.cli import main

    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("vitslim: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def lowrank_folder(tmp_path_factory):
    from vitslim.lowrank.compress import SVD, compress_lowrank

    model = compress_lowrank(tiny_vit(embed_dim=64), [torch.randn(4, 3, 32, 32)], SVD(param_ratio=0.6), progress=False)
    return vitslim.save(model, tmp_path_factory.mktemp("bad") / "lowrank")


def _tampered(source: Path, target: Path, change) -> Path:
    """A copy of the folder ``source`` whose recipe ``change(recipe)`` altered (or replaced, when it returns text)."""
    target.mkdir()
    for name in (WEIGHTS_FILE, "config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    recipe = json.loads((source / RECIPE_FILE).read_text())
    text = change(recipe)
    (target / RECIPE_FILE).write_text(text if isinstance(text, str) else json.dumps(recipe))
    return target


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a torch without CUDA")
@pytest.mark.parametrize("command", ["compress", "eval"])
def test_device_cuda_on_a_torch_without_cuda_is_refused_before_loading(tmp_path, capsys, tiny_model_folder, tiny_image_folder, command):
    out = ["--out", str(tmp_path / "out"), "--param-ratio", "0.5"] if command == "compress" else []
    err = _cli_error(capsys, [command, str(tiny_model_folder), "--data", str(tiny_image_folder), "--device", "cuda", *out])
    assert "--device cuda asked for, but this torch" in err and "use cpu" in err
    assert not (tmp_path / "out").exists()


def test_device_torch_does_not_know_is_refused(tmp_path, capsys, tiny_model_folder, tiny_image_folder):
    err = _cli_error(capsys, ["compress", str(tiny_model_folder), "--data", str(tiny_image_folder), "--out", str(tmp_path / "out"),
                              "--param-ratio", "0.5", "--device", "tpu"])
    assert "--device 'tpu' is not a device torch knows" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank, problem", [(10**12, "is 1000000000000, but the model allows 1 to 64"), (-3, "is -3, but the model allows 1 to 64")])
def test_recipe_rank_out_of_range_is_refused_before_allocating(tmp_path, capsys, lowrank_folder, monkeypatch, rank, problem):
    from vitslim.lowrank import layers

    def never(*args, **kwargs):
        raise AssertionError("no factorised layer may be built from an unchecked rank")

    folder = _tampered(lowrank_folder, tmp_path / "f", lambda recipe: recipe["steps"][0]["ranks"].update({"blocks.0.attn.qkv": rank}))
    monkeypatch.setattr(layers.LowRankLinear, "__init__", never)
    err = _cli_error(capsys, ["info", str(folder)])
    assert f"lowrank step: the rank of 'blocks.0.attn.qkv' {problem}" in err and "re-save it" in err


def test_recipe_naming_a_layer_the_model_lacks_is_refused(tmp_path, capsys, lowrank_folder):
    def rename(recipe):
        ranks = recipe["steps"][0]["ranks"]
        ranks["blocks.99.attn.qkv"] = ranks.pop("blocks.0.attn.qkv")

    err = _cli_error(capsys, ["info", str(_tampered(lowrank_folder, tmp_path / "f", rename))])
    assert "names layer 'blocks.99.attn.qkv', which the model does not have" in err


def test_recipe_nested_thousands_deep_is_refused_before_decoding(tmp_path, capsys, lowrank_folder):
    folder = _tampered(lowrank_folder, tmp_path / "f", lambda recipe: "[" * 100_000 + "]" * 100_000)
    err = _cli_error(capsys, ["info", str(folder)])
    assert "recipe.json nests deeper than 64 levels" in err


def test_recipe_building_more_than_its_weights_file_holds_is_refused_on_the_meta_device(tmp_path, capsys, lowrank_folder):
    folder = _tampered(lowrank_folder, tmp_path / "f", lambda recipe: recipe["architecture"]["model_args"].update(embed_dim=4096, num_heads=64))
    err = _cli_error(capsys, ["info", str(folder)])
    assert "builds a model" in err and "holds" in err and "re-save it" in err


def test_eval_teacher_whose_output_differs_is_refused_before_reading_images(tmp_path, capsys, tiny_image_folder):
    features = dict(patch_size=4, num_classes=0, global_pool="")
    student = vitslim.save(tiny_vit(**features), tmp_path / "student")
    teacher = vitslim.save(tiny_vit(img_size=64, **features), tmp_path / "teacher")
    err = _cli_error(capsys, ["eval", str(student), "--teacher", str(teacher), "--data", str(tmp_path / "no-such-images")])
    assert "the model outputs features of shape (65, 32) and the teacher features of shape (257, 32)" in err


def test_evaluate_teacher_of_another_input_size_on_shared_images_is_refused():
    dataset = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(VitslimError, match=r"takes 3x32x32 images and the teacher 3x64x64, and a Dataset gives both the same tensors"):
        vitslim.evaluate(tiny_vit(), dataset, teacher=tiny_vit(img_size=64))


# --- a saved recipe mutated at random: a clean error or an identical reload ----------------------


def _leaves(value, path=()):
    """(path, value) of every number and string in a JSON value, dict keys included as ("key", path)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield ("key", *path, key), key
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        yield path, value


def _replace(recipe, path, new):
    if path[0] == "key":
        *parents, key = path[1:]
        container = recipe
        for part in parents:
            container = container[part]
        container[new] = container.pop(key)
        return
    container = recipe
    for part in path[:-1]:
        container = container[part]
    container[path[-1]] = new


def _mutation(random, value):
    if isinstance(value, str):
        return random.choice(["", "blocks.99.attn.qkv", value + ".x", value.replace("0", "1"), "head", "lowrank", "int8", 7])
    return random.choice([0, -1, value + 1, value - 1, value * 1000, 10**15, 2.5, "3", None, [value]])


def test_recipe_mutated_at_random_reloads_identically_or_fails_cleanly(tmp_path):
    """Seeded and bounded (48 mutations of a low-rank, channel-pruned, token-merging, int8 tiny
    model): every mutation of a number or a name ends in a VitslimError or in a model whose
    outputs equal the original's exactly, never in another exception."""
    import random as random_module

    from vitslim.cait.patch import apply_token_merging
    from vitslim.cait.schedule import MergeSchedule
    from vitslim.cait.slicing import slice_channels
    from vitslim.deploy.quantize import quantize_int8
    from vitslim.lowrank.compress import SVD, compress_lowrank

    model = tiny_vit(patch_size=4, embed_dim=48, num_heads=3)
    slice_channels(model, masks={"0": {"qk": torch.arange(16) < 12, "v": torch.arange(16) < 10, "mlp": torch.arange(192) < 100}})
    model = compress_lowrank(model, [torch.randn(2, 3, 32, 32)], SVD(param_ratio=0.7), progress=False)
    apply_token_merging(model, MergeSchedule("tome", ((0, 8, 1),)))
    model = quantize_int8(model)
    original = vitslim.save(model, tmp_path / "original")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vitslim.load_model(original)(images)
    recipe = json.loads((original / RECIPE_FILE).read_text())
    leaves = [(path, value) for path, value in _leaves(recipe) if path[0] in ("architecture", "steps") or path[:2] == ("key", "steps")]
    random = random_module.Random(0)
    outcomes = {"error": 0, "identical": 0}
    for index in range(48):
        path, value = random.choice(leaves)
        mutated = json.loads(json.dumps(recipe))
        _replace(mutated, path, _mutation(random, value))
        folder = _tampered(original, tmp_path / str(index), lambda r, m=mutated: json.dumps(m))
        try:
            reloaded = vitslim.load_model(folder)
        except VitslimError:
            outcomes["error"] += 1
            continue
        with torch.no_grad():
            assert torch.equal(reloaded(images), expected), f"mutation {index} of {path} changed the outputs silently"
        outcomes["identical"] += 1
    assert outcomes["error"] > 10 and outcomes["identical"] > 0, outcomes
