"""Counting what a model costs (parameters, FLOPs, bytes) and scoring what it predicts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitslim._infra.distributed import active, sum_numbers


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has no rule for the CPU flash-attention kernel that scaled_dot_product_attention
# dispatches to on CPU, so attention FLOPs would silently count as zero there.
_EXTRA_FLOP_RULES = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_params(model: nn.Module) -> int:
    """Stored parameters, each shared tensor counted once (buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """FLOPs (multiply and add counted separately) of one forward pass on one image."""
    images = torch.zeros(1, *input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_RULES) as counter:
        model(images)
    return int(counter.get_total_flops())


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of every file in a model folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class ClassificationScore:
    """Streaming top-1/top-5 accuracy (over the images that have labels) and, against a teacher,
    top-1 agreement and mean KL (over every image)."""

    def __init__(self, num_classes: int) -> None:
        self.topk = min(5, num_classes)
        self.images = 0
        self.labelled = 0
        self.top1_hits = 0
        self.topk_hits = 0
        self.agreements = 0
        self.kl_sum = 0.0
        self.has_teacher = False

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None = None) -> None:
        """One batch; ``labels`` is None for unlabelled images."""
        logits = logits.float()
        ranked = logits.topk(self.topk, dim=1).indices
        self.images += logits.shape[0]
        if labels is not None:
            self.top1_hits += int((ranked[:, 0] == labels).sum())
            self.topk_hits += int((ranked == labels[:, None]).any(dim=1).sum())
            self.labelled += labels.numel()
        if teacher_logits is not None:
            self.has_teacher = True
            teacher_logits = teacher_logits.float()
            self.agreements += int((teacher_logits.argmax(1) == ranked[:, 0]).sum())
            # KL(teacher || student), summed over classes, per image
            kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True, reduction="none")
            self.kl_sum += float(kl.sum())

    def reduce_across_ranks(self) -> None:
        """Sum the counts of every ``torchrun`` rank (a no-op in one process)."""
        if not active():
            return
        images, labelled, top1, topk, agreements, kl, teacher = sum_numbers(self.images, self.labelled, self.top1_hits, self.topk_hits,
                                                                            self.agreements, self.kl_sum, float(self.has_teacher))
        self.images, self.labelled, self.top1_hits, self.topk_hits = int(images), int(labelled), int(top1), int(topk)
        self.agreements, self.kl_sum, self.has_teacher = int(agreements), kl, teacher > 0

    def result(self) -> dict:
        """``images``; ``top1``/``top5`` when any image had a label; ``agreement``/``kl`` with a teacher."""
        out: dict = {"top1": self.top1_hits / self.labelled, "top5": self.topk_hits / self.labelled} if self.labelled else {}
        out["images"] = self.images
        if self.labelled and self.topk != 5:
            out["top5_is_top"] = self.topk
        if self.has_teacher:
            n = max(self.images, 1)
            out["agreement"] = self.agreements / n
            out["kl"] = self.kl_sum / n
        return out
