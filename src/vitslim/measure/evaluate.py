"""``evaluate``: accuracy and cost of a model on labelled images, optionally against a teacher
(with a teacher the images need no labels: agreement and KL are measured on any images). A model
whose output is a map or features (a dense head, a backbone) has no accuracy: it is scored by its
fidelity to the teacher's outputs (``fidelity.MapFidelity``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from vitslim._infra import distributed
from vitslim._infra.devices import check_device
from vitslim._infra.progress import track
from vitslim.adapters import describe
from vitslim.adapters.base import ViTSpec
from vitslim.errors import VitslimError
from vitslim.io import image_batches, image_dataset, image_sources
from vitslim.measure.fidelity import MapFidelity
from vitslim.measure.metrics import ClassificationScore, count_flops, count_params
from vitslim.measure.objective import infer_kind


def _loader(source, preprocessing, *, class_names, labels_required, limit, skip, seed, batch_size, workers):
    dataset = source if isinstance(source, torch.utils.data.Dataset) else image_sources.open_images(
        source, image_dataset.build_transform(preprocessing), class_names=class_names, labels_required=labels_required
    )
    subset = image_batches.select(dataset, limit=limit, skip=skip, seed=seed)
    if distributed.active():  # this rank's shard: every world_size-th image, none twice
        subset = torch.utils.data.Subset(subset, range(distributed.rank(), len(subset), distributed.world_size()))
    return dataset, image_batches.make_loader(subset, batch_size, workers=workers)


def _shape(output: torch.Tensor, kind: str) -> str:
    return f"{output.shape[1]} class logits" if kind == "logits" else f"{kind} of shape {tuple(output.shape[1:])}"


def _check_comparable(spec: ViTSpec, output: torch.Tensor, teacher_spec: ViTSpec, device: str, *, same_images: bool) -> None:
    """Refuse, before any image is read, a teacher whose input or output cannot be set beside the
    model's: a different number of channels; a different input size when both get the same image
    tensors (a Dataset; from a path each gets its own preprocessing); outputs of another kind or
    shape (one zero image through each, at its own input size, tells)."""
    size, teacher_size = spec.preprocessing.input_size, teacher_spec.preprocessing.input_size
    if size[0] != teacher_size[0]:
        raise VitslimError(f"the model takes {size[0]}-channel images and the teacher {teacher_size[0]}-channel ones; give a teacher "
                           "that takes the same input")
    if same_images and size != teacher_size:
        raise VitslimError(f"the model takes {'x'.join(map(str, size))} images and the teacher {'x'.join(map(str, teacher_size))}, and a "
                           "Dataset gives both the same tensors; give a teacher of the model's input size, or pass the data as a path "
                           "so that each gets its own preprocessing")
    teacher_output = teacher_spec.output(torch.zeros(1, *teacher_size, device=device))
    kind, teacher_kind = infer_kind(spec, output), infer_kind(teacher_spec, teacher_output)
    if kind != teacher_kind or output.shape[1:] != teacher_output.shape[1:]:
        raise VitslimError(f"the model outputs {_shape(output, kind)} and the teacher {_shape(teacher_output, teacher_kind)}, which "
                           "cannot be compared; give a teacher whose output has the model's shape (for logits: the same classes)")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: str | os.PathLike | torch.utils.data.Dataset,
    *,
    teacher: nn.Module | None = None,
    limit: int | None = None,
    skip: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    labels_required: bool | None = None,
    threshold: float = 0.8,
    progress: bool = True,
) -> dict:
    """Top-1/top-5 (fractions), parameters, FLOPs per image and image count; with a teacher also
    top-1 agreement and mean KL(teacher || model), which need no labels to be meaningful.

    With a teacher a plain folder of unlabelled images is accepted (the result then has no
    top-1/top-5) unless ``labels_required``; without one, labels are always required.

    A path is opened with the model's own preprocessing; the teacher gets its own preprocessing
    of the same images when it differs. Under ``torchrun`` each rank scores its shard of the
    images and the counts are summed, so every rank returns the whole result.

    When the output is not class logits (``objective.infer_kind``: a map or features), a teacher
    is required and the result holds ``MapFidelity``'s figures instead: per-element ``mae`` and
    ``rmse``, mean per-image ``pearson`` and ``cosine``, ``relative_mse``, and the mean ``iou`` of
    the outputs thresholded at ``threshold`` (0.8: where a saliency map marks regions of interest).
    """
    check_device(device)
    spec = describe(model)
    model = model.to(device).eval()
    output = spec.output(torch.zeros(1, *spec.preprocessing.input_size, device=device))
    kind = infer_kind(spec, output)
    teacher_spec = None
    if teacher is not None:
        teacher_spec = describe(teacher)
        teacher = teacher.to(device).eval()
        _check_comparable(spec, output, teacher_spec, device, same_images=isinstance(data, torch.utils.data.Dataset))
    if kind != "logits" and teacher is None:
        raise VitslimError(f"this model outputs {kind}, not class logits, so it has no accuracy: give the original model as the "
                           "teacher to measure the fidelity of its outputs")
    labels_required = (teacher is None or bool(labels_required)) and kind == "logits"
    options = dict(class_names=spec.label_names, labels_required=labels_required, limit=limit, skip=skip, seed=seed, batch_size=batch_size,
                   workers=workers)
    dataset, loader = _loader(data, spec.preprocessing, **options)
    labelled = image_batches.is_labelled(dataset) and kind == "logits"
    if not labelled and teacher is None:
        raise VitslimError(f"{getattr(dataset, 'source', data)} has no labels: accuracy needs labelled images; "
                           "to compare with a reference model instead, give it as the teacher")
    teacher_batches = None
    if teacher is not None:
        if teacher_spec.preprocessing != spec.preprocessing and not isinstance(data, torch.utils.data.Dataset):
            _, teacher_loader = _loader(data, teacher_spec.preprocessing, **options)
            teacher_batches = iter(teacher_loader)
    score = ClassificationScore(spec.num_classes) if kind == "logits" else MapFidelity(threshold)
    skipped = 0
    for images, labels, dropped in track(loader, "evaluating", unit="batch", show=progress):
        teacher_images = next(teacher_batches)[0] if teacher_batches is not None else images
        skipped += dropped
        if images is None:
            continue
        if not labelled:
            labels = None
        elif int(labels.max()) >= spec.num_classes or int(labels.min()) < 0:
            raise VitslimError(
                f"the data has label {int(labels.max())} but the model has {spec.num_classes} classes; "
                "is this the right data set for this model?"
            )
        images, labels = images.to(device), None if labels is None else labels.to(device)
        teacher_outputs = teacher_spec.output(teacher_images.to(device)) if teacher_spec is not None else None
        if kind == "logits":
            score.update(spec.output(images), labels, teacher_outputs)
        else:
            score.update(spec.output(images), teacher_outputs)
    score.reduce_across_ranks()
    (skipped,) = map(int, distributed.sum_numbers(skipped))
    if score.images == 0:
        raise VitslimError(f"no readable images in {getattr(dataset, 'source', data)}; all {skipped} failed to decode")
    result = score.result()
    result.update(params=count_params(model), flops=count_flops(model, spec.preprocessing.input_size, device), skipped=skipped)
    return result
