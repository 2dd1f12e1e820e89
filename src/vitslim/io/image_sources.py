"""Images for calibration and evaluation, from whatever the user already has on disk.

Three labelled layouts are recognised without options, because users should not have to convert
data:

* an ImageFolder directory, ``DIR/<class>/<image>`` (images may sit in nested folders below the
  class folder; the class is the first folder level);
* a zip of such a directory, optionally under one top folder, read member by member without
  unpacking;
* a folder of images plus a CSV naming each file and its label: a class index, or a class name
  (indexed as folder names are).

Where no labels are needed (calibration, distillation, agreement with a teacher) a plain folder
or zip of images opens too (``labels_required=False``), every image labelled ``UNLABELLED``:
the images people have from their deployment rarely come sorted by class.
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple

import torch

from vitslim.errors import VitslimError

if TYPE_CHECKING:  # data needs no model adapter at run time
    pass

from vitslim.io.image_dataset import UNLABELLED, ImageDataset, Sample, Transform, build_transform

logger = logging.getLogger("vitslim")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
FILE_COLUMNS = ("file", "filename", "path", "image")
LABEL_COLUMNS = ("label", "class_index", "target", "class", "y")
# The folder a CSV's files may live in, next to the CSV (as in imagenet-sample-256/).
CSV_IMAGE_FOLDER = "images"


# --- source detection -----------------------------------------------------------------------


def open_images(
    path: str | os.PathLike,
    transform: Transform | None = None,
    *,
    label_column: str | None = None,
    class_names: list[str] | None = None,
    labels_required: bool = True,
    model: torch.nn.Module | None = None,
) -> ImageDataset:
    """Open an ImageFolder directory, a zip of one, or a CSV of files and labels (see module doc);
    with ``labels_required=False`` also a plain folder or zip of images, unlabelled.

    ``model``: the model the images are for. Unless given, ``transform`` is then its evaluation
    transform (``build_transform`` of its preprocessing: resized, cropped and normalised as it
    expects) and ``class_names`` its label names. Without a transform or a model, images are
    ``[3, H, W]`` in ``[0, 1]`` at their own size, which no model should calibrate on.

    ``class_names`` are the model's label names: when every class folder is among them, folders
    are labelled by their position in it, so a folder subset of ImageNet keeps ImageNet indices.
    Otherwise sorted folder names become 0..K-1. A CSV whose labels are class names rather than
    indices is labelled the same way, except that a name missing from ``class_names`` is an
    error (a CSV cannot fall back on folder order). ``label_column`` only applies to CSV sources.
    """
    if model is not None:
        from vitslim.adapters import describe

        spec = describe(model)
        transform = transform or build_transform(spec.preprocessing)
        class_names = class_names if class_names is not None else spec.label_names
    path = Path(path).expanduser().absolute()  # samples must survive a later chdir
    if not path.exists():
        raise VitslimError(f"{path} does not exist: give an image folder, a .zip of one, or a labels .csv")
    if path.is_dir():
        return _open_directory(path, transform, label_column, class_names, labels_required)
    if path.suffix.lower() == ".csv":
        return _open_csv(path, transform, label_column, class_names)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return _open_zip(path, transform, class_names, labels_required)
    raise VitslimError(f"{path} is not a folder, .zip or .csv: give an image folder, a .zip of one, or a labels .csv")


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _scan_class_folders(root: Path) -> dict[str, list[str]]:
    """Image paths under each non-hidden sub-folder of ``root``, sorted; empty folders included."""
    found: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or _is_hidden(entry.name):
            continue
        files: list[str] = []
        for folder, subfolders, names in os.walk(entry):
            subfolders[:] = [name for name in subfolders if not _is_hidden(name)]
            files += [os.path.join(folder, name) for name in names if not _is_hidden(name) and _is_image(name)]
        found[entry.name] = sorted(files)
    return found


def _open_directory(
    root: Path, transform: Transform | None, label_column: str | None, class_names: list[str] | None, labels_required: bool
) -> ImageDataset:
    """Decide between ImageFolder and CSV; an ``images/`` folder beside one CSV belongs to the CSV."""
    by_class = _scan_class_folders(root)
    folders_with_images = {name for name, files in by_class.items() if files}
    csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv" and not _is_hidden(p.name))
    if csvs and folders_with_images <= {CSV_IMAGE_FOLDER}:
        if len(csvs) > 1:
            names = ", ".join(p.name for p in csvs)
            raise VitslimError(f"{root} holds {len(csvs)} CSV files ({names}): pass the path of the one that lists the labels")
        return _open_csv(csvs[0], transform, label_column, class_names)
    if folders_with_images:
        return _labelled_by_folder(by_class, f"image folder {root}", transform, class_names)
    flat = sorted(str(p) for p in root.iterdir() if p.is_file() and _is_image(p.name) and not _is_hidden(p.name))
    if flat and not labels_required:
        return _unlabelled(flat, f"image folder {root}", transform)
    if flat:
        raise VitslimError(
            f"{root} has images but no labels: put them in one sub-folder per class, or add a CSV of file and label"
        )
    raise VitslimError(f"{root} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): check the path")


def _unlabelled(references: list[str], source: str, transform: Transform | None, zip_path: str | None = None) -> ImageDataset:
    return ImageDataset([(ref, UNLABELLED) for ref in references], source=f"{source} (unlabelled)", classes=None, transform=transform,
                        zip_path=zip_path, labelled=False)


def _labelled_by_folder(
    by_class: dict[str, list[str]],
    source: str,
    transform: Transform | None,
    class_names: list[str] | None,
    zip_path: str | None = None,
) -> ImageDataset:
    classes, index = _class_index(sorted(by_class), class_names, source)
    samples = [(ref, index[name]) for name, refs in by_class.items() for ref in refs]
    samples.sort(key=lambda sample: (sample[1], sample[0]))
    return ImageDataset(samples, source=source, classes=classes, transform=transform, zip_path=zip_path)


def _class_index(
    folders: list[str], class_names: list[str] | None, source: str
) -> tuple[list[str], dict[str, int]]:
    """Label each class folder: by the model's names when they cover every folder, else sorted order."""
    if class_names is not None:
        unknown = [name for name in folders if name not in class_names]
        if not unknown:
            return list(class_names), {name: class_names.index(name) for name in folders}
        logger.warning(
            f"{source}: folders {unknown[:5]} are not among the model's label names; "
            f"labelling the {len(folders)} folders 0..{len(folders) - 1} in sorted order instead"
        )
    return list(folders), {name: i for i, name in enumerate(folders)}


# --- zip ---------------------------------------------------------------------------------------


def _open_zip(path: Path, transform: Transform | None, class_names: list[str] | None, labels_required: bool) -> ImageDataset:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise VitslimError(f"{path} is not a valid zip archive ({error}): re-create or re-download it") from None
    by_class = _zip_classes(names)
    if not any(by_class.values()) and not labels_required:
        images = sorted(name for name, _ in _zip_images(_zip_entries(names)))
        if images:
            return _unlabelled(images, f"zip {path}", transform, zip_path=str(path))
    if not any(by_class.values()):
        raise VitslimError(f"{path} holds no images in class folders (<class>/<image> or <top>/<class>/<image>): check the archive")
    return _labelled_by_folder(by_class, f"zip {path}", transform, class_names, zip_path=str(path))


def _zip_entries(names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(member name, path parts) of every member outside hidden folders, folder entries included."""
    entries = [(name, PurePosixPath(name).parts) for name in names]
    return [(name, parts) for name, parts in entries if parts and not any(_is_hidden(p) for p in parts)]


def _zip_images(entries: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
    return [(name, parts) for name, parts in entries if not name.endswith("/") and _is_image(name)]


def _zip_classes(names: list[str]) -> dict[str, list[str]]:
    """Member names per class folder; one top folder holding every image (``test/<class>/``) is skipped.

    Folder entries (ending in ``/``) name classes but are never samples, so an empty class folder
    still takes its index, as it does for a directory.
    """
    entries = _zip_entries(names)
    images = _zip_images(entries)
    tops = {parts[0] for _, parts in images}
    depth = 1 if len(tops) == 1 and all(len(parts) >= 3 for _, parts in images) else 0
    by_class: dict[str, list[str]] = {}
    for name, parts in entries:
        is_folder = name.endswith("/")
        if len(parts) > depth + (0 if is_folder else 1):
            by_class.setdefault(parts[depth], [])
            if not is_folder and _is_image(name):
                by_class[parts[depth]].append(name)
    return by_class


# --- CSV ---------------------------------------------------------------------------------------


def _open_csv(path: Path, transform: Transform | None, label_column: str | None, class_names: list[str] | None) -> ImageDataset:
    column, rows = _read_csv_rows(path, label_column)
    labels, classes = _csv_labels(path, column, rows, class_names)
    samples = _resolve_files(path, [(row.file, label) for row, label in zip(rows, labels)])
    return ImageDataset(samples, source=f"CSV {path}", classes=classes, transform=transform)


class _CsvRow(NamedTuple):
    file: str
    label: str
    name: str | None  # the optional class-name column
    line: int


def _read_csv_rows(path: Path, label_column: str | None) -> tuple[str, list[_CsvRow]]:
    """The label column's name, and every row with its label as written."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        if not columns:
            raise VitslimError(f"{path} is empty: it needs a header row such as 'file,label' and one row per image")
        file_column = next((c for c in FILE_COLUMNS if c in columns), columns[0])
        label_key = _label_column(path, columns, label_column)
        rows = []
        for row in reader:
            label = (row.get(label_key) or "").strip()
            if not label:
                raise VitslimError(
                    f"{path} line {reader.line_num}: no label in column '{label_key}'; give every row a class index or a class name"
                )
            rows.append(_CsvRow((row[file_column] or "").strip(), label, row.get("name"), reader.line_num))
    if not rows:
        raise VitslimError(f"{path} lists no images: add one row per image with its file and label")
    return label_key, rows


def _label_column(path: Path, columns: list[str], requested: str | None) -> str:
    available = ", ".join(columns)
    if requested is not None:
        if requested not in columns:
            raise VitslimError(f"{path} has no column '{requested}': its columns are {available}; pass one of them as label_column")
        return requested
    found = next((c for c in LABEL_COLUMNS if c in columns), None)
    if found is None:
        raise VitslimError(
            f"{path} has no label column ({', '.join(LABEL_COLUMNS)}): its columns are {available}; "
            "rename the one that holds the labels to 'label'"
        )
    return found


def _csv_labels(path: Path, column: str, rows: list[_CsvRow], class_names: list[str] | None) -> tuple[list[int], list[str] | None]:
    """Each row's class index, and the class names when known.

    A column of integers holds indices. Any other column holds class names, indexed as folder
    names are (by the model's label names, else in sorted order); a column mixing both is refused,
    because sorting indices as names ("10" before "2") would mislabel the images silently.
    """
    named = [row for row in rows if not _is_integer(row.label)]
    if not named:
        labels = [int(row.label) for row in rows]
        return labels, _csv_classes([(label, row.name) for label, row in zip(labels, rows)])
    if len(named) < len(rows):
        first = named[0]
        raise VitslimError(
            f"{path} line {first.line}: label '{first.label}' in column '{column}' is not an integer, but other rows give class "
            "indices; label every row with a class index, or every row with a class name"
        )
    distinct = {row.label for row in rows}
    if class_names is None:
        classes = sorted(distinct)
    else:
        unknown = sorted(distinct - set(class_names))
        if unknown:
            raise VitslimError(
                f"{path}: {len(unknown)} class name(s) in column '{column}' are not among the model's {len(class_names)} label names "
                f"(first: {', '.join(unknown[:5])}); use the model's names (e.g. {', '.join(class_names[:3])}) or class indices"
            )
        classes = list(class_names)
    index = {name: classes.index(name) for name in distinct}
    return [index[row.label] for row in rows], classes


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _resolve_files(csv_path: Path, rows: list[Sample]) -> list[Sample]:
    """Find each file beside the CSV, else in its ``images/`` folder; all must exist."""
    folders = (csv_path.parent, csv_path.parent / CSV_IMAGE_FOLDER)
    samples: list[Sample] = []
    missing: list[str] = []
    for file, label in rows:
        found = next((folder / file for folder in folders if (folder / file).is_file()), None)
        if found is None:
            missing.append(file)
        else:
            samples.append((str(found), label))
    if missing:
        first = ", ".join(missing[:3])
        raise VitslimError(
            f"{csv_path} names {len(missing)} file(s) that do not exist (first: {first}); "
            f"files are looked up in {folders[0]} and {folders[1]}"
        )
    return samples


def _csv_classes(pairs: list[tuple[int, str | None]]) -> list[str] | None:
    """Class names from a ``name`` column, when each label 0..K-1 has exactly one name."""
    names: dict[int, set[str]] = {}
    for label, name in pairs:
        if name is None:
            return None
        names.setdefault(label, set()).add(name)
    if sorted(names) != list(range(len(names))) or any(len(v) != 1 for v in names.values()):
        return None
    return [next(iter(names[label])) for label in range(len(names))]
