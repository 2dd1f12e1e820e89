"""What a new user hit outside the CLI's happy path (issue P13), one test or more per item.

Item 1 (plain ``import timm`` in setup.sh's venv) is in test_compat.py; item 3's README quick start
in test_readme.py."""

import logging
import math
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COMPRESSIBLE, tiny_vit
from PIL import Image

import vitslim
from vitslim._infra.atomic import atomic_file, atomic_folder, claimed
from vitslim.apps import cli
from vitslim.cait.compress import compress_cait
from vitslim.deploy.export import INT8_TOLERANCE
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.image_batches import make_loader
from vitslim.io.image_sources import open_images
from vitslim.measure import runtimes
from vitslim.methods import Inputs

# --- item 2: 16-bit PNGs ------------------------------------------------------------------------

def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / "grey16.png")
    assert Image.open(tmp_path / "a" / "grey16.png").mode.startswith("I")
    image, _ = open_images(tmp_path)[0]
    assert image.shape == (3, 64, 64)
    assert float((image == 1.0).float().mean()) < 0.01  # PIL's own conversion left 99.6% at 1.0
    assert float((image[0] - torch.from_numpy(wide / 65535)).abs().max()) <= 1 / 255


# --- item 3: the model's transform by default ---------------------------------------------------

def test_open_images_with_the_model_takes_its_transform_and_labels(tiny_image_folder):
    model = tiny_vit()
    image, _ = open_images(tiny_image_folder, model=model)[0]
    assert image.shape == (3, 32, 32)  # the 40x40 PNGs resized to the model's input
    assert image.min() < 0  # normalised, not raw [0, 1] pixels


def test_images_of_different_sizes_without_a_transform_are_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    for size in (20, 30):
        Image.new("RGB", (size, size)).save(tmp_path / "a" / f"{size}.png")
    with pytest.raises(VitslimError, match=r"open_images\(path, model=model\)"):
        next(iter(make_loader(open_images(tmp_path), batch_size=2)))


def test_compress_refuses_images_opened_without_a_transform(tiny_image_folder):
    with pytest.raises(VitslimError, match="without a transform"):
        vitslim.compress(tiny_vit(), "lowrank", open_images(tiny_image_folder), param_ratio=0.5)


# --- item 4: the ONNX cache, temporary names, one writer per output, SIGTERM ---------------------

def test_a_damaged_onnx_cache_entry_is_exported_again(tmp_path, caplog):
    model = tiny_vit()
    entry = tmp_path / f"{runtimes.onnx_cache_key(model)[:32]}.onnx"
    entry.write_bytes(b"not a protobuf")
    with caplog.at_level(logging.WARNING):
        assert runtimes.checked_onnx("tiny", model, tmp_path, 1e-3) == entry
    assert "exporting it again" in caplog.text and entry.stat().st_size > 1000


def test_two_writers_of_one_file_use_their_own_temporary_names(tmp_path):
    target, partials = tmp_path / "model.onnx", []

    def outer(partial):
        partials.append(partial)
        partial.write_text("outer")
        atomic_file(target, lambda inner: partials.append(inner) or inner.write_text("inner"))  # a concurrent run
        assert partial.read_text() == "outer"

    atomic_file(target, outer)
    assert partials[0] != partials[1] and target.read_text() == "outer"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_second_run_on_the_same_output_fails_at_its_start(tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.vitslim-lock"
    lock.write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(VitslimError, match="another vitslim run"):
        with claimed(out):
            pass
    lock.write_text("999999999")  # no such process: a run killed outright
    with claimed(out):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_sigterm_during_a_save_leaves_no_staging_folder(tmp_path, monkeypatch):
    """The CLI turns SIGTERM into SystemExit, so atomic_folder removes its staging folder."""
    installed = []
    monkeypatch.setattr(cli.cli, "main", lambda **_: installed.append(signal.getsignal(signal.SIGTERM)))
    assert cli.main(["info", "x"]) == 0 and installed == [cli._terminated]
    previous = signal.signal(signal.SIGTERM, cli._terminated)
    try:
        def killed_while_writing(staging):
            (staging / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)

        with pytest.raises(SystemExit) as exit_info:
            atomic_folder(tmp_path / "out", killed_while_writing)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []


# --- item 5: low-rank on a CAIT folder ----------------------------------------------------------

def test_lowrank_on_a_token_merging_model_is_a_clear_error(tmp_path):
    merging = compress_cait(tiny_vit(**COMPRESSIBLE), vitslim.Cait(speedup=1.3, measure=False), Inputs(progress=False))
    reloaded = vitslim.load_model(vitslim.save(merging, tmp_path / "cait"))
    batches = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    with pytest.raises(VitslimError, match="already merges tokens"):
        vitslim.compress(reloaded, vitslim.LowRank(param_ratio=0.6), batches)


# --- item 6: the int8 tolerance's default, and what it means -----------------------------------

def test_the_int8_tolerance_default_is_the_one_the_readme_explains():
    from pathlib import Path

    option = next(param for param in cli.cli.commands["export"].params if param.name == "int8_tolerance")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert option.default == INT8_TOLERANCE == 0.2
    assert f"--int8-tolerance ({INT8_TOLERANCE:g})" in readme and "not an accuracy promise" in readme


# --- item 7: values that cannot meet their promise, refused up front ----------------------------

@pytest.mark.parametrize("share", [0.5, -3, 1, math.nan, math.inf])
def test_token_speedup_must_be_above_1(share):
    with pytest.raises(ParameterError, match="token_speedup must be greater than 1"):
        vitslim.Cait(speedup=1.5, token_speedup=share, measure=False)


@pytest.mark.parametrize("arguments", [["export", "no-such-model", "--onnx", "x.onnx", "--tolerance", "-1"],
                                       ["export", "no-such-model", "--onnx", "x.onnx", "--int8", "dynamic", "--int8-tolerance", "nan"],
                                       ["bench", "no-such-model", "--onnx-tolerance", "0"]])
def test_tolerances_are_checked_before_any_work(arguments, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert "must be a finite number above 0" in error and "no-such-model" not in error
    assert list(tmp_path.iterdir()) == []


# --- item 8: long work says where it is, piped and without -v -----------------------------------

def test_piped_cli_prints_progress_without_verbose(tiny_model_folder, tiny_image_folder):
    done = subprocess.run([sys.executable, "-m", "vitslim", "eval", str(tiny_model_folder), "--data", str(tiny_image_folder)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vitslim._infra.progress: evaluating: batch 1/1" in done.stderr


# --- item 9: saved files as readable as the user's others ---------------------------------------

def test_a_saved_model_gets_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        folder = vitslim.save(tiny_vit(), tmp_path / "model")
        onnx = atomic_file(tmp_path / "report.md", lambda partial: partial.write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {
        "model.safetensors": 0o644, "recipe.json": 0o644, "config.json": 0o644}
    assert stat.S_IMODE(onnx.stat().st_mode) == 0o644
