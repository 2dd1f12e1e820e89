"""``evaluate``: accuracy and cost of a model on labelled images, optionally against a teacher
(with a teacher the images need no labels: agreement and KL are measured on any images). A model
whose output is a map or features (a dense head, a backbone) has no accuracy: it is scored by its
fidelity to the teacher's outputs (``fidelity.MapFidelity``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from vitslim import data as imagedata
from vitslim import distributed
from vitslim.adapters import describe
from vitslim.errors import VitslimError
from vitslim.fidelity import MapFidelity
from vitslim.metrics import ClassificationScore, count_flops, count_params
from vitslim.objective import infer_kind
from vitslim.progress import track


def _loader(source, preprocessing, *, class_names, labels_required, limit, skip, seed, batch_size, workers):
    dataset = source if isinstance(source, torch.utils.data.Dataset) else imagedata.open_images(
        source, imagedata.build_transform(preprocessing), class_names=class_names, labels_required=labels_required
    )
    subset = imagedata.select(dataset, limit=limit, skip=skip, seed=seed)
    if distributed.active():  # this rank's shard: every world_size-th image, none twice
        subset = torch.utils.data.Subset(subset, range(distributed.rank(), len(subset), distributed.world_size()))
    return dataset, imagedata.make_loader(subset, batch_size, workers=workers)


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
    spec = describe(model)
    model = model.to(device).eval()
    with torch.no_grad():
        kind = infer_kind(spec, spec.output(torch.zeros(1, *spec.preprocessing.input_size, device=device)))
    if kind != "logits" and teacher is None:
        raise VitslimError(f"this model outputs {kind}, not class logits, so it has no accuracy: give the original model as the "
                           "teacher (--teacher) to measure the fidelity of its outputs")
    labels_required = (teacher is None or bool(labels_required)) and kind == "logits"
    options = dict(class_names=spec.label_names, labels_required=labels_required, limit=limit, skip=skip, seed=seed, batch_size=batch_size,
                   workers=workers)
    dataset, loader = _loader(data, spec.preprocessing, **options)
    labelled = imagedata.is_labelled(dataset) and kind == "logits"
    if not labelled and teacher is None:
        raise VitslimError(f"{getattr(dataset, 'source', data)} has no labels: accuracy needs labelled images; "
                           "to compare with a reference model instead, give it as the teacher (--teacher)")
    teacher_batches, teacher_spec = None, None
    if teacher is not None:
        teacher_spec = describe(teacher)
        teacher = teacher.to(device).eval()
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
