"""One pipeline for every method: images → compress → optional KD recovery → optional int8 (→ save).

``compress`` is the Python entry point and ``compress_to_folder`` the CLI's (it also loads the
model, opens the image folder and saves). Whatever the method, the same code calibrates on the
same seeded subset of the images, distils the compressed model against the original when asked
(``recovery``), and quantises its weights to int8 when asked, so every method gets both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from vitslim.deploy.quantize import check_kind, quantize_int8
from vitslim.errors import ParameterError, VitslimError
from vitslim.io import image_batches, image_dataset, image_sources
from vitslim.measure.objective import check_objective
from vitslim.methods import Inputs, Method, configure
from vitslim.train import Training, distill

CALIB_IMAGES = 256
CALIB_BATCH = 32


def calibration_batches(images: Dataset | Iterable | None, calib_images: int, seed: int, batch_size: int) -> Iterable | None:
    """``calib_images`` of a Dataset, a seeded subset as batches; other iterables are batches
    already and are taken as they are."""
    if images is None or not isinstance(images, Dataset):
        return images
    if len(images) < calib_images:
        raise ParameterError("calib_images", f"asks for {calib_images} images, more than the {len(images)} the training images hold; lower it")
    return image_batches.make_loader(image_batches.select(images, limit=calib_images, seed=seed), batch_size)


def compress(
    model: nn.Module,
    method: Method | str = "lowrank",
    images: Dataset | Iterable | None = None,
    *,
    calib_images: int = CALIB_IMAGES,
    calib_batch_size: int = CALIB_BATCH,
    seed: int = 0,
    device: str = "cpu",
    recovery: Training | None = None,
    int8: bool | str = False,
    objective: str = "auto",
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """A compressed copy of ``model`` by ``method``: a method's config (``vitslim.LowRank(param_ratio=0.5)``,
    ``vitslim.Cait(speedup=1.5)``, ``vitslim.LowRankCait(...)``; ``vitslim.methods``), or its
    registered name with the config's fields as ``options`` (``"lowrank", param_ratio=0.5``), which
    builds the same config.

    ``images`` are training images, never the ones you report on: a Dataset of (image, label)
    (``vitslim.io.image_sources.open_images``; labels are not needed), of which ``calib_images`` (a subset
    drawn from ``seed``) calibrate, or an iterable of preprocessed image batches, all of which
    calibrate. ``recovery`` distils the original into the result over all of ``images``;
    ``int8`` then quantises its Linear weights (per output channel): ``"weight"`` (or ``True``)
    weight-only, the smallest file; ``"dynamic"`` activations too, at run time, for int8 matmuls
    that run faster on CPU (``vitslim.deploy.quantize``). A method that plans int8 itself
    (``lowrank+cait`` with an ``int8_axis``) has its planned int8 applied here instead. The result is on the CPU; the original is left
    as it was, on its own device.

    ``model`` may be a user's model holding the ViT (a dense head on a backbone): the ViT is
    compressed and the whole model's output preserved, judged by ``objective`` ("logits": KL,
    "map": per-pixel MSE, "features": relative MSE; "auto" follows the output, ``vitslim.measure.objective``),
    which every step that judges a candidate receives.
    """
    config = configure(method, **options)
    int8_kind = _int8_kind(int8)
    if int8_kind is not None and config.plans_int8:
        raise ParameterError("int8", f"is planned by the {config.name} method here (its int8_axis); leave int8 out")
    check_objective(objective)
    if isinstance(calib_images, bool) or not (isinstance(calib_images, int) and calib_images >= 1):
        raise ParameterError("calib_images", f"must be at least 1 (got {calib_images})")
    if config.needs_images and images is None:
        raise VitslimError(f"the {config.name} method calibrates on images: pass training images")
    if isinstance(images, Dataset) and image_batches.untransformed(images):
        raise VitslimError("the images were opened without a transform (raw pixels, not resized or normalised for the model): "
                           "open them with vitslim.open_images(path, model=model)")
    if recovery is not None and recovery.epochs and images is None:
        raise VitslimError("recovery distils on the training images: pass them as images")
    calibration = calibration_batches(images, calib_images, seed, calib_batch_size) if config.calibrates else None
    inputs = Inputs(train=images, calibration=calibration, calib_images=calib_images, seed=seed, device=device, progress=progress,
                    objective=objective)
    home = next(model.parameters()).device
    try:
        compressed = config.compress(model, inputs)
        if recovery is not None and recovery.epochs:
            distill(compressed, model, images, recovery, objective=objective)
    finally:
        model.to(home)
    compressed.to("cpu")
    planned = config.planned_int8(compressed)
    if planned is not None:
        int8_kind, keep_float = planned
    else:
        keep_float = ()
    if int8_kind is not None:
        compressed = quantize_int8(compressed, int8_kind, keep_float=keep_float)
    return compressed


def _int8_kind(int8: bool | str | None) -> str | None:
    """The int8 kind ``compress`` was asked for, checked before any work: ``True`` keeps its old
    meaning, weight-only; ``False``/``None`` means none."""
    if int8 is None or int8 is False:
        return None
    if int8 is True:
        return "weight"
    return check_kind(int8, "int8")


def compress_to_folder(model: str | os.PathLike | nn.Module, data: str | os.PathLike, out: str | os.PathLike, method: Method, *,
                       report=None, **settings: Any) -> tuple[nn.Module, nn.Module, Path]:
    """The whole pipeline on a model name or folder and an image folder: load, open the images
    (labels not needed), ``compress`` by the ``method`` config with the pipeline's ``settings``, save to ``out`` (rank 0 alone under
    ``torchrun``). ``out`` is checked before any work. ``report``, when given, receives the
    method's lines about the result before it is saved. Returns the original, the result and
    the folder."""
    from vitslim._infra.atomic import claimed
    from vitslim._infra.distributed import is_main, on_main
    from vitslim.adapters import describe
    from vitslim.io.loading import load_model
    from vitslim.io.persist import check_output_folder, save

    check_output_folder(out)
    # rank 0 alone writes, so it alone claims out: a second run aiming at it fails now, not after its work
    with claimed(Path(out)) if is_main() else contextlib.nullcontext():
        original = load_model(model)
        spec = describe(original)
        images = image_sources.open_images(data, image_dataset.build_transform(spec.preprocessing), class_names=spec.label_names, labels_required=False)
        compressed = compress(original, method, images, **settings)
        if report is not None:
            for line in method.report(original, compressed):
                report(line)
        folder = on_main(lambda: save(compressed, Path(out)))
    return original, compressed, folder
