"""The README's Python quick start runs as written (issue P13 item 3), on the shared vit-d6-cifar10
and a few CIFAR-10 images, with only its placeholder paths replaced."""

import re
import zipfile
from pathlib import Path

import pytest
from shared_paths import CIFAR_TEST_ZIP, SHARED, VIT_D6, needs_shared

README = Path(__file__).resolve().parents[1] / "README.md"
CIFAR_TRAIN_ZIP = SHARED / "data" / "cifar10-jpeg" / "train.zip"
TRAIN_IMAGES = 64


def python_quick_start() -> str:
    text = README.read_text()
    found = re.search(r"^From Python.*?\n```python\n(.*?)^```", text, re.S | re.M)
    assert found, "README.md has no 'From Python' block"
    return found.group(1)


def _image_folder(archive: Path, folder: Path, count: int) -> Path:
    """The first ``count`` images of a CIFAR zip (class folders under one top folder) as an ImageFolder."""
    with zipfile.ZipFile(archive) as source:
        members = sorted(name for name in source.namelist() if name.endswith(".jpg"))[::97][:count]
        for name in members:
            target = folder / Path(name).parent.name / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read(name))
    return folder


@needs_shared
@pytest.mark.slow
def test_the_python_quick_start_runs_as_written(tmp_path, monkeypatch):
    """Every call runs as written; only their sizes shrink (64 calibration images, short timing
    batches), which keeps this test at about a minute instead of six: the code paths are the same."""
    import functools

    import vitslim
    from vitslim.cait import speed

    monkeypatch.setattr(vitslim, "compress", functools.partial(vitslim.compress, calib_images=TRAIN_IMAGES))
    monkeypatch.setattr(vitslim, "benchmark", functools.partial(vitslim.benchmark, batch_size=2, warmup=1))
    monkeypatch.setattr(speed, "time_against", functools.partial(speed.time_against, batch_size=4))
    code = python_quick_start()
    for placeholder in ("local-dir:path/to/my-vit", "path/to/val-images", "path/to/train-images"):
        assert f'"{placeholder}"' in code, placeholder
    code = (code.replace("local-dir:path/to/my-vit", f"local-dir:{VIT_D6}")
            .replace("path/to/val-images", str(_image_folder(CIFAR_TEST_ZIP, tmp_path / "val", 64)))
            .replace("path/to/train-images", str(_image_folder(CIFAR_TRAIN_ZIP, tmp_path / "train", TRAIN_IMAGES))))
    monkeypatch.chdir(tmp_path)  # its outputs go to out/
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["train_dataset"].transform is not None
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"my-vit-50", "my-vit-50.onnx", "my-vit-50.pt2"}
