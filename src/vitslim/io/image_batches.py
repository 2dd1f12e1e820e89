"""Seeded subsets of images, and the batches vitslim computes with.

Batches travel as ``Batch`` values (images, labels, skipped); ``as_batch`` reads every form of
batch a user may pass instead (a bare image tensor, an (images, labels) pair). ``make_loader``
drops the images a source could not decode from their batch and counts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vitslim.errors import ParameterError, VitslimError

if TYPE_CHECKING:  # data needs no model adapter at run time
    pass

from vitslim.io.image_dataset import ImageDataset

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
            "(image, label) samples as a torch Dataset, or batch them with vitslim.io.image_batches.make_loader"
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


def leading_images(batches: Iterable, count: int, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The first ``count`` images of ``batches`` (fewer if they run out), batch by batch; a
    loader's batch whose every image was unreadable (``None``) is passed over."""
    images = []
    for batch in batches:
        if count <= 0:
            break
        readable = as_batch(batch, "a calibration batch").images
        if readable is None:
            continue
        images.append(readable[:count].to(device))
        count -= images[-1].shape[0]
    return images
