"""What "close to the original" means for a model: the loss every method preserves.

A classifier is judged by its class distribution (KL), a saliency or segmentation model by its
per-pixel map, a backbone by its features. The methods (the merge schedule's choice, channel
gates, layer sensitivity, distillation) all compare a compressed model's output with the
original's through one ``Objective``: the kind the caller names, or with "auto" the one the output
itself calls for (``objective_for``), so a ViT inside a user's dense model is compressed for what
that model does, not for its backbone's logits. The kind travels as an argument (the pipeline's
``Inputs.objective``) to every step that judges a candidate, never on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitslim.adapters.base import ViTSpec
from vitslim.errors import ParameterError
from vitslim.measure.fidelity import dense_loss, output_kind

KINDS = ("logits", "map", "features")
CHOICES = ("auto", *KINDS)


@dataclass(frozen=True)
class Objective:
    """``kind`` "logits": KL(teacher ‖ model) over classes; "map": per-pixel MSE; "features": MSE
    relative to the teacher's per-image variance (scale-free, so one learning rate fits any
    backbone's feature scale)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParameterError("objective", f"is {self.kind!r}; choose one of {', '.join(CHOICES)}")

    def per_image(self, outputs: torch.Tensor, teacher_outputs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``(B,)``: how far each image's output is from the teacher's (0 when equal)."""
        outputs, teacher_outputs = outputs.float(), teacher_outputs.float()
        if outputs.shape != teacher_outputs.shape:
            raise ValueError(f"the model's output has shape {tuple(outputs.shape)} but the original's {tuple(teacher_outputs.shape)}")
        if self.kind == "logits":
            log_p = F.log_softmax(outputs / temperature, dim=-1)
            log_q = F.log_softmax(teacher_outputs / temperature, dim=-1)
            return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1) * temperature**2
        return dense_loss(self.kind, outputs, teacher_outputs)

    def sensitivity_loss(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scalar whose squared gradients estimate how much each activation moves the output
        (empirical Fisher): for logits the loss of the model's own top class; for maps and features,
        whose own-output loss has no gradient, a random projection of the output, whose squared
        gradient is in expectation the Gauss-Newton diagonal of the MSE."""
        if self.kind == "logits":
            return F.cross_entropy(outputs, outputs.argmax(1).detach(), reduction="sum")
        directions = torch.randn(outputs.shape, generator=generator, device=generator.device, dtype=outputs.dtype)
        return (outputs * directions.to(outputs.device)).sum()


def infer_kind(spec: ViTSpec, output: torch.Tensor) -> str:
    """``fidelity.output_kind`` of the output, except that a ``(B, K)`` output of a user's model
    around a ViT counts as logits (its own head), whatever the ViT's class count."""
    if spec.root is not None and output.dim() == 2 and output.shape[1] > 1:
        return "logits"
    return output_kind(output, spec.num_classes)


def check_objective(kind: str) -> str:
    """``kind`` if it names an objective or "auto", else an error that lists them."""
    if kind not in CHOICES:
        raise ParameterError("objective", f"is {kind!r}; choose one of {', '.join(CHOICES)}")
    return kind


def objective_for(spec: ViTSpec, output: torch.Tensor, kind: str = "auto") -> Objective:
    """The objective ``kind`` names, or for "auto" the one the model's ``output`` calls for."""
    return Objective(infer_kind(spec, output) if check_objective(kind) == "auto" else kind)


def mean_divergence(model_spec: ViTSpec, teacher_outputs: list[torch.Tensor], images: list[torch.Tensor], objective: str = "auto") -> float:
    """Mean over images of the ``objective``'s distance from the teacher's outputs (given per batch
    of ``images``) to the model's."""
    total, count = 0.0, 0
    with torch.no_grad():
        for reference, batch in zip(teacher_outputs, images):
            total += float(objective_for(model_spec, reference, objective).per_image(model_spec.output(batch), reference).sum())
            count += batch.shape[0]
    return total / count
