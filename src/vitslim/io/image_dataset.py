"""One source's images as a torch Dataset, decoded defensively, and the transform a model expects.

An image that cannot be decoded, or is over PIL's decompression-bomb pixel limit, is not an
error: ``ImageDataset`` returns ``None`` for it and logs a warning once, and
``image_batches.make_loader`` drops it from its batch and counts it, so one bad file does not
abort an hour-long evaluation but cannot go unnoticed either. Where the images come from (a
folder, a zip, a CSV) is ``image_sources``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitslim._compat import import_timm

if TYPE_CHECKING:  # data needs no model adapter at run time
    from vitslim.adapters.base import Preprocessing

logger = logging.getLogger("vitslim")

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
