"""Judging a compressed model whose output is a dense map or a feature tensor, not class logits.

A saliency decoder on a ViT backbone gives (B, 1, H, W) maps in (0, 1); a bare backbone gives
(B, N, C) token features. Neither has labels to score against, so a compressed model is judged
by its fidelity to the teacher (the original model) on the same images: how far its values are
(``mae``, ``rmse``, the scale-free ``relative_mse``), whether it keeps the teacher's pattern
(``pearson``, ``cosine``) and, for maps, whether it keeps the same salient region (``iou``).

``MapFidelity`` keeps running sums only, never the maps, so an evaluation over a million images
costs no more memory than one batch, and sums the same way over ``torchrun`` ranks as
``vitslim.measure.metrics.ClassificationScore``. ``output_kind`` tells logits from maps and features, and
``dense_loss`` is the per-image distillation loss for the latter two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitslim._infra.distributed import active, sum_numbers


def _flat_pair(outputs: Tensor, teacher_outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Both tensors as float32 (B, elements per image), after checking they can be compared."""
    if outputs.shape != teacher_outputs.shape:
        raise ValueError(f"the model's output has shape {tuple(outputs.shape)} but the teacher's has "
                         f"{tuple(teacher_outputs.shape)}; fidelity compares outputs of the same shape")
    if outputs.dim() == 0:
        raise ValueError("fidelity needs outputs with a batch dimension first, got a scalar")
    return outputs.float().reshape(outputs.shape[0], -1), teacher_outputs.float().reshape(teacher_outputs.shape[0], -1)


class MapFidelity:
    """Streaming fidelity of a model's dense outputs to its teacher's, for maps and features.

    Per-element errors (``mae``, ``rmse``) are averaged over every element of every image; the
    per-image scores (``pearson``, ``iou``, ``cosine``) are averaged over images, each image
    counting once whatever its size. Conventions where a score is undefined for an image:

    * ``pearson`` when the teacher's map is constant (zero variance): 1.0 if the model's map is
      identical to it, else 0.0 (``constant_teacher`` in the result counts such images, so the
      convention's weight is visible); when only the model's map is constant: 0.0.
    * ``iou`` when neither map has an element above the threshold: 1.0 (they agree that nothing
      is salient).
    * ``cosine`` when either output is all zeros: 1.0 if both are, else 0.0.

    An image whose output is identical to the teacher's scores exactly 1.0 on all three, with no
    rounding below it.
    """

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold
        self.images = 0
        self.elements = 0
        self.absolute_error_sum = 0.0
        self.squared_error_sum = 0.0
        self.teacher_squared_deviation_sum = 0.0
        self.pearson_sum = 0.0
        self.iou_sum = 0.0
        self.cosine_sum = 0.0
        self.constant_teacher_images = 0

    @torch.no_grad()
    def update(self, outputs: Tensor, teacher_outputs: Tensor) -> None:
        """One batch: outputs of the same shape, batch first, any trailing shape (computed in float32)."""
        student, teacher = _flat_pair(outputs, teacher_outputs)
        error = student - teacher
        self.images += student.shape[0]
        self.elements += student.numel()
        self.absolute_error_sum += float(error.abs().sum(1).double().sum())
        self.squared_error_sum += float(error.square().sum(1).double().sum())

        identical = (student == teacher).all(1)
        # Constancy is tested exactly (max == min): a float32 mean of equal values need not equal
        # them, so deviations of a constant map can be rounding noise that Pearson would magnify.
        teacher_constant = teacher.amax(1) == teacher.amin(1)
        student_constant = student.amax(1) == student.amin(1)
        teacher_deviation = torch.where(teacher_constant[:, None], 0.0, teacher - teacher.mean(1, keepdim=True))
        student_deviation = student - student.mean(1, keepdim=True)
        self.teacher_squared_deviation_sum += float(teacher_deviation.square().sum(1).double().sum())
        self.constant_teacher_images += int(teacher_constant.sum())

        correlation = (student_deviation * teacher_deviation).sum(1) / (
            student_deviation.norm(dim=1) * teacher_deviation.norm(dim=1))
        correlation = torch.where(teacher_constant | student_constant, 0.0, correlation.clamp(-1.0, 1.0))
        self.pearson_sum += float(torch.where(identical, 1.0, correlation).double().sum())

        student_salient, teacher_salient = student > self.threshold, teacher > self.threshold
        intersection = (student_salient & teacher_salient).sum(1)
        union = (student_salient | teacher_salient).sum(1)
        iou = torch.where(union == 0, 1.0, intersection / union.clamp_min(1))
        self.iou_sum += float(iou.double().sum())

        norms = student.norm(dim=1) * teacher.norm(dim=1)
        cosine = torch.where(norms == 0, 0.0, (student * teacher).sum(1) / norms).clamp(-1.0, 1.0)
        self.cosine_sum += float(torch.where(identical, 1.0, cosine).double().sum())

    def reduce_across_ranks(self) -> None:
        """Sum the running sums of every ``torchrun`` rank (a no-op in one process)."""
        if not active():
            return
        (images, elements, absolute, squared, deviation, pearson, iou, cosine, constant) = sum_numbers(
            self.images, self.elements, self.absolute_error_sum, self.squared_error_sum,
            self.teacher_squared_deviation_sum, self.pearson_sum, self.iou_sum, self.cosine_sum,
            self.constant_teacher_images)
        self.images, self.elements, self.constant_teacher_images = int(images), int(elements), int(constant)
        self.absolute_error_sum, self.squared_error_sum, self.teacher_squared_deviation_sum = absolute, squared, deviation
        self.pearson_sum, self.iou_sum, self.cosine_sum = pearson, iou, cosine

    def result(self) -> dict:
        """``images`` and ``threshold``; with at least one image also ``mae``, ``rmse``, ``pearson``,
        ``iou``, ``cosine``, ``relative_mse`` and ``constant_teacher`` (see the class docstring).

        ``relative_mse`` is the squared error summed over all elements divided by the teacher's
        squared deviations from its per-image mean, summed the same way: 1.0 is as bad as
        predicting each image's mean. It is 0.0 when there is no error, and None (undefined)
        when there is error but every teacher map is constant."""
        out: dict = {"images": self.images, "threshold": self.threshold}
        if not self.images:
            return out
        if self.squared_error_sum == 0:
            relative_mse = 0.0
        elif self.teacher_squared_deviation_sum == 0:
            relative_mse = None
        else:
            relative_mse = self.squared_error_sum / self.teacher_squared_deviation_sum
        out.update(mae=self.absolute_error_sum / self.elements, rmse=(self.squared_error_sum / self.elements) ** 0.5,
                   pearson=self.pearson_sum / self.images, iou=self.iou_sum / self.images,
                   cosine=self.cosine_sum / self.images, relative_mse=relative_mse,
                   constant_teacher=self.constant_teacher_images)
        return out


def output_kind(output: Tensor, num_classes: int) -> str:
    """What a model's output is: "logits", "map" or "features".

    The kind decides both how a compressed model is evaluated (accuracy, agreement and KL for
    logits; ``MapFidelity`` otherwise) and what its recovery training minimises (KL to the
    teacher's softmax for logits; ``dense_loss`` otherwise), so it is decided in one place:

    * "logits": (B, K) with K == ``num_classes`` > 0, a classifier's head.
    * "map": any 4-D (B, C, H, W) output, a dense prediction such as a saliency map.
    * "features": everything else, such as (B, N, C) tokens or a (B, C) embedding from a model
      without a classifier (``num_classes`` 0) or whose width is not ``num_classes``.
    """
    if output.dim() == 2 and num_classes > 0 and output.shape[1] == num_classes:
        return "logits"
    if output.dim() == 4:
        return "map"
    return "features"


def dense_loss(kind: str, outputs: Tensor, teacher_outputs: Tensor) -> Tensor:
    """Per-image (B,) distillation loss of ``outputs`` against the teacher's, in float32 and
    differentiable with respect to ``outputs``.

    * "map": mean squared error per pixel, averaged per image; maps share a scale (often (0, 1)),
      so the plain error is meaningful.
    * "features": the same mean squared error divided by the teacher's per-image variance (mean
      squared deviation from its mean), so the loss does not depend on the features' scale and
      1.0 is as bad as predicting the teacher's mean. An image whose teacher features are
      constant has no scale to be relative to and keeps the plain mean squared error.

    "logits" is refused: a classifier is distilled with KL to the teacher's softmax instead.
    """
    if kind == "logits":
        raise ValueError("dense_loss is for maps and features; distil logits with KL to the teacher's softmax")
    if kind not in ("map", "features"):
        raise ValueError(f"unknown output kind {kind!r}; expected 'map' or 'features'")
    student, teacher = _flat_pair(outputs, teacher_outputs)
    mean_squared_error = (student - teacher).square().mean(1)
    if kind == "map":
        return mean_squared_error
    # Constancy is tested exactly, as in MapFidelity: the variance of a constant map can come out
    # as rounding noise, and dividing by it would blow the loss up.
    teacher_constant = teacher.amax(1) == teacher.amin(1)
    return mean_squared_error / torch.where(teacher_constant, 1.0, teacher.var(1, correction=0))
