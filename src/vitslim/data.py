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

An image that cannot be decoded, or is over PIL's decompression-bomb pixel limit, is not an
error: ``ImageDataset`` returns ``None`` for it, logs a warning once, and ``make_loader`` drops
it from its batch and counts it, so one bad file does not abort an hour-long evaluation but
cannot go unnoticed either.

Batches travel as ``Batch`` values (images, labels, skipped); ``as_batch`` reads every form of
batch a user may pass instead (a bare image tensor, an (images, labels) pair).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from vitslim._compat import import_timm
from vitslim.errors import ParameterError, VitslimError

if TYPE_CHECKING:  # data needs no model adapter at run time
    from vitslim.adapters.base import Preprocessing

logger = logging.getLogger("vitslim")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
FILE_COLUMNS = ("file", "filename", "path", "image")
LABEL_COLUMNS = ("label", "class_index", "target", "class", "y")
# The folder a CSV's files may live in, next to the CSV (as in imagenet-sample-256/).
CSV_IMAGE_FOLDER = "images"
# Everything PIL or zipfile raise for a file that is damaged, truncated or not an image at all.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error)
# PIL's decompression-bomb check only warns between its limit and twice that, then decodes anyway.
_OVERSIZED = (Image.DecompressionBombWarning, Image.DecompressionBombError)

UNLABELLED = -1

Transform = Callable[[Image.Image], torch.Tensor]
Sample = tuple[str, int]


class ImageDataset(Dataset):
    """Images from one source. ``dataset[i]`` is ``(image, label)``; ``labelled`` is False for a
    source without labels, whose every label is ``UNLABELLED``.

    ``image`` is the transformed tensor, or ``None`` when the file cannot be decoded; a warning
    naming the file is then logged to the ``vitslim`` logger, once per file and process.
    Without a transform, ``image`` is a float tensor ``[3, H, W]`` in ``[0, 1]``.

    ``samples`` holds ``(reference, label)`` pairs: a file path, or a member name of the zip at
    ``zip_path``. The zip is opened lazily, once per process, because an open ``ZipFile`` must not
    be shared by DataLoader worker processes (they would race on one file offset).
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        source: str,
        classes: list[str] | None,
        transform: Transform | None = None,
        zip_path: str | None = None,
        labelled: bool = True,
    ) -> None:
        self.samples = samples
        self.labelled = labelled
        self.source = source
        self.classes = classes
        self.transform = transform
        self.zip_path = zip_path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        reference, label = self.samples[index]
        image = self._decode(reference)
        if image is None:
            return None, label
        return (self.transform or _to_tensor)(image), label

    def __getstate__(self) -> dict:
        # Workers started by spawn/forkserver get a pickled copy: drop the handle, they reopen it.
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_zip_pid"] = None
        return state

    def _decode(self, reference: str) -> Image.Image | None:
        """The image, or None (with a warning) when it cannot be decoded or is too large to decode
        safely: an image over PIL's pixel limit could exhaust memory, the decompression bomb PIL
        guards against, so it is treated as unreadable rather than decoded after a warning."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _to_rgb(Image.open(self._open(reference)))
        except _OVERSIZED as error:
            self._warn_once(reference, f"skipping image {self._describe(reference)}: {_pixel_count(error)}, over PIL's "
                                       f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); "
                                       "downscale it to use it")
        except _DECODE_ERRORS as error:
            self._warn_once(reference, f"skipping unreadable image {self._describe(reference)}: {error}")
        return None

    def _warn_once(self, reference: str, message: str) -> None:
        if reference not in self._warned:
            self._warned.add(reference)
            logger.warning(message)

    def _open(self, reference: str) -> str | io.BytesIO:
        if self.zip_path is None:
            return reference
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return io.BytesIO(self._zip.read(reference))

    def _describe(self, reference: str) -> str:
        return reference if self.zip_path is None else f"{self.zip_path}:{reference}"


def _pixel_count(error: Warning | Exception) -> str:
    """How many pixels PIL found, which its decompression-bomb check gives only in its message."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,} pixels" if found else str(error)


# Modes PIL opens 16-bit grey images (PNG, TIFF) in; "I" is 32-bit, as older PIL opened 16-bit PNGs.
_WIDE_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_WIDE_TO_8_BIT = 65535 / 255


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every model here takes 3 channels; palette transparency goes through RGBA to avoid a PIL warning.

    16-bit grey is scaled to 8 bits first: PIL's own conversion clips every value above 255, so a
    16-bit PNG came out almost all white (99.6% of its values at 1.0 in one user's image)."""
    with image:
        if image.mode in _WIDE_GREY:
            wide = np.asarray(image, dtype=np.float64)
            return Image.fromarray(np.clip(np.rint(wide / _WIDE_TO_8_BIT), 0, 255).astype(np.uint8)).convert("RGB")  # uint8 2-D: mode L
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def build_transform(preprocessing: Preprocessing) -> Transform:
    """The evaluation transform the model was trained to expect (resize, crop, normalise).

    timm is imported here, not at module level, so that opening data stays cheap.
    """
    timm = import_timm()
    return timm.data.create_transform(
        input_size=preprocessing.input_size,
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,
        std=preprocessing.std,
        crop_pct=preprocessing.crop_pct,
        crop_mode=preprocessing.crop_mode,
        is_training=False,
    )


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


# --- subsets and batches -------------------------------------------------------------------------


def select(dataset: Sequence | Dataset, *, limit: int | None = None, skip: int = 0, seed: int = 0) -> Subset:
    """A seeded random subset, so calibration and evaluation can draw disjoint, reproducible sets.

    The indices are permuted with ``seed``; the first ``skip`` are left out (reserved, e.g. for
    calibration via ``select(limit=skip)``), then the first ``limit`` of the rest are taken.
    They are returned sorted, so reading stays roughly sequential on disk.
    """
    size = len(dataset)
    if limit is not None and limit <= 0:
        raise ParameterError("limit", f"must be at least 1 (got {limit})")
    if skip < 0:
        raise ParameterError("skip", f"must be at least 0 (got {skip})")
    if skip >= size:
        raise ParameterError("skip", f"is {skip}, which leaves none of the {size} images available: lower it or use more images")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[skip:]
    if limit is not None:
        order = order[:limit]
    return Subset(dataset, sorted(order.tolist()))


def is_labelled(dataset: Dataset) -> bool:
    """False for an unlabelled ``ImageDataset``, also behind ``Subset``s; True for anything else."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "labelled", True)


class Batch(NamedTuple):
    """One batch of images in the one form vitslim computes with; ``as_batch`` reads the others."""

    images: torch.Tensor | None  # [batch, channels, height, width]; None when no image of it could be decoded
    labels: Any = None  # as given (make_loader: a long tensor); None for a bare image tensor
    skipped: int = 0  # unreadable images make_loader dropped from the batch


def as_batch(item: object, what: str = "a batch") -> Batch:
    """``item``, one batch in any form vitslim accepts, as a ``Batch``. Accepted:

    * an image tensor ``[batch, channels, height, width]``, without labels;
    * ``(images, labels)``, as a ``DataLoader`` over ``(image, label)`` samples gives it;
    * ``(images, labels, skipped)``, as ``make_loader`` gives it (a ``Batch`` is one).

    In a pair or triple ``images`` may be None: ``make_loader`` could decode no image of the
    batch. A torch ``Dataset`` is not a batch but what ``make_loader`` batches. Anything else is
    a ``VitslimError`` naming ``what`` ("a training batch"); a tensor of another shape most
    likely is a single sample, which the error says to batch first.
    """
    forms = "an image tensor, (images, labels) or (images, labels, skipped)"
    if isinstance(item, torch.Tensor):
        batch = Batch(item)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        batch = Batch(item[0], item[1], int(item[2]) if len(item) == 3 else 0)
    else:
        raise VitslimError(f"{what} must be {forms}, not {type(item).__name__}")
    images = batch.images
    if images is None or (isinstance(images, torch.Tensor) and images.ndim == 4):
        return batch
    if isinstance(images, torch.Tensor):
        raise VitslimError(
            f"{what} holds images of shape {tuple(images.shape)}, not [batch, channels, height, width]; pass single "
            "(image, label) samples as a torch Dataset, or batch them with vitslim.data.make_loader"
        )
    raise VitslimError(f"{what} must be {forms}, not a {type(item).__name__} holding {type(images).__name__} images")


def make_loader(dataset: Dataset, batch_size: int, *, workers: int = 0) -> DataLoader:
    """``Batch``es in dataset order: ``(images, labels, skipped)``.

    Unreadable images are dropped from their batch and counted in ``skipped``; ``labels`` holds
    the labels of the images kept. When every image of a batch was unreadable, ``images`` is
    ``None`` and ``labels`` is empty. Images must share one size (use ``build_transform``).
    """
    if batch_size <= 0:
        raise ParameterError("batch_size", f"must be at least 1 (got {batch_size})")
    if workers < 0:
        raise ParameterError("workers", f"must be at least 0 (got {workers})")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate_readable)


def untransformed(dataset: Dataset) -> bool:
    """True for an ``ImageDataset`` (also behind ``Subset``s) opened without a transform: raw
    pixels in [0, 1] at each image's own size, not what a model takes."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, ImageDataset) and dataset.transform is None


def _collate_readable(batch: list[tuple[torch.Tensor | None, int]]) -> Batch:
    kept = [(image, label) for image, label in batch if image is not None]
    sizes = sorted({tuple(image.shape) for image, _ in kept})
    if len(sizes) > 1:
        raise VitslimError(f"images of {len(sizes)} sizes in one batch ({' and '.join('x'.join(map(str, size)) for size in sizes[:2])}): "
                           "open them with the model's transform, vitslim.open_images(path, model=model), so that each is resized "
                           "and normalised as the model expects")
    images = torch.stack([image for image, _ in kept]) if kept else None
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return Batch(images, labels, len(batch) - len(kept))
