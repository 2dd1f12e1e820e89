"""vitslim.io: source detection, labels, unreadable images, subsets and batches."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitslim.adapters.base import IMAGENET_PREPROCESSING, Preprocessing
from vitslim.errors import VitslimError
from vitslim.io.image_batches import Batch, as_batch, is_labelled, make_loader, select
from vitslim.io.image_dataset import UNLABELLED, build_transform
from vitslim.io.image_sources import open_images

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = Preprocessing(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)

# class folder -> {relative file name: (mode, colour)}; folder labels in sorted order are bird 0, cat 1, dog 2.
IMAGES = {
    "bird": {"g.jpg": ("RGB", (0, 0, 200)), "h.PNG": ("RGB", (10, 200, 10)), "p.png": ("P", None)},
    "cat": {"a.png": ("RGB", (200, 0, 0)), "b.jpeg": ("RGB", (0, 200, 0)), "c.png": ("L", 90)},
    "dog": {"d.jpg": ("RGB", (250, 250, 0)), "e.png": ("RGBA", (0, 90, 90, 128)), "nested/f.png": ("RGB", (7, 7, 7))},
}
LABELS = {"bird": 0, "cat": 1, "dog": 2}


def _write_image(path: Path, mode: str, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # palette with a transparent entry
        image = Image.new("P", (9, 7), 1)
        image.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
        image.save(path, transparency=0)
    else:
        Image.new(mode, (9, 7), colour).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder layout with mixed formats, plus a hidden file, a hidden folder and a text file."""
    root = tmp_path / "folder"
    for folder, files in IMAGES.items():
        for name, (mode, colour) in files.items():
            _write_image(root / folder / name, mode, colour)
    (root / "dog" / ".hidden.jpg").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("ignore me")
    (root / ".cache" / "x").mkdir(parents=True)
    _write_image(root / ".cache" / "x" / "y.png", "RGB", (1, 2, 3))
    return root


def _zip_folder(root: Path, target: Path, top: str | None) -> Path:
    """Zip ``root`` as a user would: with folder entries, optionally under one top folder."""
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(target, "w") as archive:
        if top:
            archive.writestr(prefix, "")
        archive.writestr("__MACOSX/._junk.jpg", b"resource fork")
        for folder, _, files in sorted(os.walk(root)):
            relative = Path(folder).relative_to(root).as_posix()
            if relative != ".":
                archive.writestr(f"{prefix}{relative}/", "")
            for name in sorted(files):
                member = name if relative == "." else f"{relative}/{name}"
                archive.write(Path(folder) / name, prefix + member)
    return target


def _relative(dataset, root: Path | None = None, top: str | None = None) -> list[tuple[str, int]]:
    """Samples as (class-relative posix name, label), comparable across folder and zip."""
    out = []
    for reference, label in dataset.samples:
        name = Path(reference).relative_to(root).as_posix() if root else reference
        out.append((name.removeprefix(f"{top}/") if top else name, label))
    return out


def test_image_folder_labels_classes_and_pixels(image_folder: Path) -> None:
    dataset = open_images(image_folder)
    assert dataset.classes == ["bird", "cat", "dog"]
    expected = sorted((f"{folder}/{name}", LABELS[folder]) for folder, files in IMAGES.items() for name in files)
    assert sorted(_relative(dataset, image_folder)) == expected  # hidden, .txt and .cache ignored
    by_name = {Path(ref).name: i for i, (ref, _) in enumerate(dataset.samples)}
    gray, label = dataset[by_name["c.png"]]
    assert label == 1 and gray.shape == (3, 7, 9) and torch.allclose(gray, torch.full_like(gray, 90 / 255))
    red, _ = dataset[by_name["a.png"]]
    assert torch.allclose(red[:, 0, 0], torch.tensor([200 / 255, 0.0, 0.0]))
    rgba, _ = dataset[by_name["e.png"]]
    palette, _ = dataset[by_name["p.png"]]
    assert rgba.shape == palette.shape == (3, 7, 9)
    assert torch.allclose(palette[:, 0, 0], torch.tensor([30, 60, 90]) / 255)


@pytest.mark.parametrize("top", ["test", None])
def test_zip_gives_same_samples_and_tensors_as_folder(image_folder: Path, tmp_path: Path, top: str | None) -> None:
    folder = open_images(image_folder)
    packed = open_images(_zip_folder(image_folder, tmp_path / "set.zip", top))
    assert packed.classes == folder.classes
    assert _relative(packed, top=top) == _relative(folder, image_folder)
    for index in range(len(folder)):
        (a, label_a), (b, label_b) = folder[index], packed[index]
        assert label_a == label_b and torch.equal(a, b)


def test_zip_reads_in_worker_process(image_folder: Path, tmp_path: Path) -> None:
    """The ZipFile is opened per process, so a worker must not reuse the parent's handle."""
    dataset = open_images(_zip_folder(image_folder, tmp_path / "set.zip", "train"), build_transform(TINY))
    dataset[0]  # opens the zip in this process first
    batches = list(make_loader(dataset, batch_size=4, workers=1))
    assert torch.cat([labels for _, labels, _ in batches]).tolist() == [label for _, label in dataset.samples]
    assert all(skipped == 0 for _, _, skipped in batches)


def test_zip_class_folders_with_no_images_keep_their_index(tmp_path: Path) -> None:
    target = tmp_path / "set.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("ant/", "")
        archive.writestr("bee/x.png", _png_bytes(tmp_path))
    dataset = open_images(target)
    assert dataset.classes == ["ant", "bee"] and dataset.samples == [("bee/x.png", 1)]


def _png_bytes(tmp_path: Path) -> bytes:
    _write_image(tmp_path / "one.png", "RGB", (5, 6, 7))
    return (tmp_path / "one.png").read_bytes()


def test_class_names_give_model_indices(image_folder: Path) -> None:
    names = ["x", "dog", "y", "cat", "bird"]
    dataset = open_images(image_folder, class_names=names)
    assert dataset.classes == names
    assert {Path(ref).parent.name: label for ref, label in dataset.samples if "nested" not in ref} == {
        "dog": 1,
        "cat": 3,
        "bird": 4,
    }


def test_class_names_missing_a_folder_fall_back_to_sorted_order(image_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vitslim"):
        dataset = open_images(image_folder, class_names=["cat", "dog"])
    assert dataset.classes == ["bird", "cat", "dog"]
    assert "bird" in caplog.text


@pytest.fixture
def csv_set(tmp_path: Path) -> Path:
    """Images split between the CSV's folder and its images/ folder, labelled in two columns."""
    root = tmp_path / "csvset"
    _write_image(root / "top.png", "RGB", (1, 1, 1))
    _write_image(root / "images" / "one.jpg", "RGB", (2, 2, 2))
    _write_image(root / "images" / "two.png", "L", 3)
    (root / "labels.csv").write_text(
        "file,class_index,name,other\ntop.png,1,beta,7\nimages/one.jpg,0,alpha,8\ntwo.png,1,beta,9\n"
    )
    return root


def test_csv_by_file_and_by_directory(csv_set: Path) -> None:
    for path in (csv_set / "labels.csv", csv_set):
        dataset = open_images(path)
        assert [(Path(ref).relative_to(csv_set).as_posix(), label) for ref, label in dataset.samples] == [
            ("top.png", 1),
            ("images/one.jpg", 0),
            ("images/two.png", 1),
        ]
        assert dataset.classes == ["alpha", "beta"]
        assert dataset[2][0].shape == (3, 7, 9)


def test_csv_label_column_override(csv_set: Path) -> None:
    dataset = open_images(csv_set / "labels.csv", label_column="other")
    assert [label for _, label in dataset.samples] == [7, 8, 9]
    with pytest.raises(VitslimError, match="no column 'missing'.*file, class_index, name, other"):
        open_images(csv_set, label_column="missing")


def test_csv_errors(csv_set: Path) -> None:
    bad = csv_set / "labels.csv"
    bad.write_text("file,label\ntop.png,1\ngone.png,0\nalso_gone.jpg,1\n")
    with pytest.raises(VitslimError, match=r"names 2 file\(s\) that do not exist \(first: gone.png, also_gone.jpg\)"):
        open_images(bad)
    bad.write_text("file,label\ntop.png,1\nimages/one.jpg,\n")  # class names are labels too: see test_bad_inputs.py
    with pytest.raises(VitslimError, match="line 3: no label in column 'label'"):
        open_images(bad)
    bad.write_text("file,species\ntop.png,cat\n")
    with pytest.raises(VitslimError, match="no label column.*file, species"):
        open_images(bad)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(VitslimError, match="does not exist"):
        open_images(tmp_path / "nowhere")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(VitslimError, match="contains no images"):
        open_images(tmp_path / "empty")
    _write_image(tmp_path / "loose" / "a.png", "RGB", (1, 1, 1))
    with pytest.raises(VitslimError, match="no labels"):
        open_images(tmp_path / "loose")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(VitslimError, match="corrupt.zip is not a valid zip"):
        open_images(tmp_path / "corrupt.zip")
    with zipfile.ZipFile(tmp_path / "texts.zip", "w") as archive:
        archive.writestr("cat/readme.txt", "hello")
    with pytest.raises(VitslimError, match="texts.zip holds no images"):
        open_images(tmp_path / "texts.zip")


def test_a_plain_folder_or_zip_of_images_opens_unlabelled_where_labels_are_not_required(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    for index, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        _write_image(loose / f"{index}.png", "RGB", colour)
    (loose / ".hidden.png").write_bytes(b"not an image")
    (loose / "notes.txt").write_text("ignore me")
    dataset = open_images(loose, build_transform(TINY), labels_required=False)
    assert len(dataset) == 3 and not dataset.labelled and not is_labelled(select(dataset, limit=2))
    assert [label for _, label in dataset.samples] == [UNLABELLED] * 3
    images, labels, skipped = next(iter(make_loader(dataset, 4)))
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [UNLABELLED] * 3 and skipped == 0
    with zipfile.ZipFile(tmp_path / "loose.zip", "w") as archive:
        for index in range(3):
            archive.write(loose / f"{index}.png", f"{index}.png")
    zipped = open_images(tmp_path / "loose.zip", build_transform(TINY), labels_required=False)
    assert not zipped.labelled and torch.equal(next(iter(make_loader(zipped, 4)))[0], images)
    with pytest.raises(VitslimError, match="no labels"):
        open_images(loose)
    with pytest.raises(VitslimError, match="holds no images in class folders"):
        open_images(tmp_path / "loose.zip")


def test_labelled_sources_stay_labelled_when_labels_are_not_required(image_folder: Path) -> None:
    dataset = open_images(image_folder, labels_required=False)
    assert dataset.labelled and is_labelled(dataset)
    assert _relative(dataset, image_folder) == _relative(open_images(image_folder), image_folder)


def test_unreadable_image_is_skipped_counted_and_warned_once(image_folder: Path, caplog) -> None:
    (image_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    dataset = open_images(image_folder, build_transform(TINY))
    broken = next(i for i, (ref, _) in enumerate(dataset.samples) if ref.endswith("broken.jpg"))
    with caplog.at_level(logging.WARNING, logger="vitslim"):
        assert dataset[broken] == (None, 1)
        images, labels, skipped = next(iter(make_loader(dataset, batch_size=len(dataset))))
    assert skipped == 1 and images.shape == (len(dataset) - 1, 3, 8, 8)
    assert labels.tolist() == [label for i, (_, label) in enumerate(dataset.samples) if i != broken]
    assert len([record for record in caplog.records if "broken.jpg" in record.getMessage()]) == 1
    only_broken = list(make_loader(dataset, batch_size=1))[broken]
    assert only_broken[0] is None and only_broken[1].tolist() == [] and only_broken[2] == 1


def test_build_transform_uses_size_mean_and_std() -> None:
    image = Image.new("RGB", (20, 12), (255, 0, 51))
    transform = build_transform(Preprocessing(input_size=(3, 6, 10), mean=(0.5, 0.0, 0.2), std=(0.5, 1.0, 0.1)))
    tensor = transform(image)
    assert tensor.shape == (3, 6, 10)
    assert torch.allclose(tensor[:, 3, 5], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)


def test_select_is_seeded_sorted_and_splits_disjointly() -> None:
    data = list(range(100))
    first = select(data, limit=10, seed=3).indices
    assert first == select(data, limit=10, seed=3).indices == sorted(first)
    assert first != select(data, limit=10, seed=4).indices
    calibration = set(select(data, limit=30, seed=3).indices)
    evaluation = set(select(data, skip=30, seed=3).indices)
    assert not calibration & evaluation and len(calibration | evaluation) == 100
    assert len(select(data, limit=10, skip=95).indices) == 5


def test_select_and_loader_reject_bad_numbers() -> None:
    data = list(range(5))
    with pytest.raises(VitslimError, match="^limit must be at least 1"):
        select(data, limit=0)
    with pytest.raises(VitslimError, match="^skip must be at least 0"):
        select(data, skip=-1)
    with pytest.raises(VitslimError, match="leaves none"):
        select(data, skip=5)
    with pytest.raises(VitslimError, match="^batch_size must be at least 1"):
        make_loader(data, batch_size=0)


BATCH_IMAGES = torch.zeros(2, 3, 8, 8)
BATCH_LABELS = torch.tensor([4, 7])


@pytest.mark.parametrize("item, expected", [
    (BATCH_IMAGES, Batch(BATCH_IMAGES, None, 0)),  # a bare image tensor: no labels
    ((BATCH_IMAGES, BATCH_LABELS), Batch(BATCH_IMAGES, BATCH_LABELS, 0)),  # a DataLoader's pair
    ([BATCH_IMAGES, [4, 7]], Batch(BATCH_IMAGES, [4, 7], 0)),  # a list, labels as given
    ((BATCH_IMAGES, BATCH_LABELS, 3), Batch(BATCH_IMAGES, BATCH_LABELS, 3)),  # make_loader's triple
    ((None, torch.zeros(0), 2), Batch(None, torch.zeros(0), 2)),  # a triple whose every image was unreadable
], ids=["tensor", "pair", "list-pair", "triple", "unreadable-triple"])
def test_as_batch_reads_every_accepted_form(item, expected) -> None:
    def same(got, wanted) -> bool:
        return torch.equal(got, wanted) if isinstance(wanted, torch.Tensor) else got == wanted

    batch = as_batch(item)
    assert isinstance(batch, Batch) and batch.skipped == expected.skipped
    assert same(batch.images, expected.images) and same(batch.labels, expected.labels)


def test_make_loader_gives_batches_as_batch_takes_unchanged(image_folder: Path) -> None:
    loaded = next(iter(make_loader(open_images(image_folder, build_transform(TINY)), batch_size=4)))
    assert isinstance(loaded, Batch) and as_batch(loaded) == loaded


@pytest.mark.parametrize("item, message", [
    (None, "must be an image tensor, .* not NoneType"),
    ("images", "not str"),
    ((BATCH_IMAGES,), "not tuple"),  # too short for a pair
    ((BATCH_IMAGES, BATCH_LABELS, 0, 0), "not tuple"),  # too long for a triple
    (("images", BATCH_LABELS), "not a tuple holding str images"),
    (torch.zeros(3, 8, 8), r"shape \(3, 8, 8\), not \[batch, channels, height, width\]"),  # one image, unbatched
    ((torch.zeros(3, 8, 8), 1), "pass single .* samples as a torch Dataset"),  # an (image, label) sample
], ids=["none", "str", "one-tuple", "four-tuple", "pair-of-str", "single-image", "single-sample"])
def test_as_batch_refuses_other_forms_clearly(item, message) -> None:
    with pytest.raises(VitslimError, match=message):
        as_batch(item)


def test_as_batch_errors_name_what_was_read() -> None:
    with pytest.raises(VitslimError, match="^a training batch must be"):
        as_batch(None, "a training batch")


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found ({path}); real-data checks need it")
    return path


def test_real_cifar10_test_zip() -> None:
    dataset = open_images(_shared("cifar10-jpeg", "test.zip"))
    assert len(dataset) == 10_000
    assert dataset.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dataset.transform = build_transform(Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))
    image, label = dataset[9_999]
    assert image.shape == (3, 32, 32) and label == 9


def test_real_imagenet_sample_csv() -> None:
    labels = _shared("imagenet-sample-256", "labels.csv")
    dataset = open_images(labels, build_transform(IMAGENET_PREPROCESSING))
    assert len(dataset) == 1_000 and len(open_images(labels.parent)) == 1_000
    tench = next(i for i, (ref, _) in enumerate(dataset.samples) if Path(ref).name == "n01440764_tench.jpg")
    image, label = dataset[tench]
    assert label == 0 and dataset.classes[0] == "tench" and image.shape == (3, 224, 224)
