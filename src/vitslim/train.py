"""``distill``: a knowledge-distillation fine-tune of a compressed student against its original.

Design notes 1.1.5 and 1.2.3 call for a short recovery fine-tune after compression; this trainer
is shared by the methods (low-rank now, channel pruning later, which adds its budget penalty via
``extra_loss``). It is **our reading** of "knowledge distillation from the dense model": the
papers' abstracts do not say which loss, schedule or optimiser they use. We use the standard
Hinton loss on logits only, AdamW and a cosine schedule with linear warm-up.

Everything that decides the result is a function of the arguments, so runs are reproducible and
resumable exactly:

* the sample order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone;
* torch's global RNG (dropout, drop-path) is re-seeded from ``(seed, e)`` at the start of each
  epoch, inside ``torch.random.fork_rng`` so the caller's RNG is left as it was;
* the learning rate is a pure function of the step position, not a stateful scheduler;
* a checkpoint is written after every finished epoch (``vitslim.io.checkpoints``): the student and
  AdamW's moment tensors in safetensors, everything else (epoch, step, seed, hyper-parameters,
  optimiser structure) in JSON. Nothing is pickled, so a checkpoint can be read without executing code.

Under ``torchrun`` (see ``vitslim._infra.distributed``) ``batch_size`` stays the *global* batch: each
rank reads ``batch_size / world_size`` images of every step's batch through a
``DistributedSampler`` over the same permutation a single process draws, the student runs under
``DistributedDataParallel`` (which averages the gradients), and only rank 0 writes checkpoints.
With equal per-rank shares every step therefore sees the same images and the same averaged
gradient as a single process, and the weights agree up to float summation order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler

from vitslim._infra import distributed
from vitslim._infra.progress import Progress
from vitslim.adapters import describe
from vitslim.adapters.base import primary_output
from vitslim.errors import ParameterError, VitslimError
from vitslim.io import checkpoints, image_batches, image_dataset
from vitslim.measure.objective import check_objective, objective_for

logger = logging.getLogger("vitslim")

_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds
WARMUP_FRACTION = 0.05  # of all steps: distill's linear warm-up before the cosine

ExtraLoss = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class Training:
    """The settings of one training run, as one value: CDCP's gate training and KD recovery take
    one each (``compress(..., recovery=Training(epochs=1))``), so their settings never mix.

    ``epochs`` over all the training images; ``lr`` the peak AdamW learning rate (warm-up, then
    cosine); ``batch_size`` the global batch (under ``torchrun`` shared by the processes);
    ``seed`` draws the sample order and re-seeds dropout; ``device`` runs it; ``checkpoints`` is
    a folder for per-epoch checkpoints (pickle-free), which ``resume`` continues from; ``progress``
    shows a progress bar.
    """

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    checkpoints: str | os.PathLike | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise ParameterError("Training.epochs", f"must be a whole number of at least 0 (got {self.epochs})")
        if not self.lr > 0:
            raise ParameterError("Training.lr", f"(the learning rate) must be above 0 (got {self.lr})")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ParameterError("Training.batch_size", f"must be at least 1 (got {self.batch_size})")
        if self.resume and self.checkpoints is None:
            raise ParameterError("Training.resume", "needs Training.checkpoints, the folder the interrupted run wrote")

    def within(self, name: str) -> Training:
        """The same settings with checkpoints in the sub-folder ``name`` (one per run of a pipeline)."""
        return self if self.checkpoints is None else replace(self, checkpoints=Path(self.checkpoints) / name)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | Iterable,
    training: Training,
    *,
    weight_decay: float = 0.05,
    temperature: float = 1.0,
    label_weight: float = 0.0,
    warmup_fraction: float = WARMUP_FRACTION,
    grad_clip: float | None = 1.0,
    extra_loss: ExtraLoss | None = None,
    before_step: Callable[[nn.Module, int, int], object] | None = None,
    workers: int = 0,
    objective: str = "auto",
) -> nn.Module:
    """Fine-tune ``student`` (in place) to match ``teacher``'s outputs for ``training.epochs``
    epochs; return it in eval mode.

    Per batch the loss is the objective's distance from the teacher's output to the student's,
    averaged over images (``vitslim.measure.objective``; ``objective`` names the kind, "auto" follows the
    output): for class logits ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, for maps and features an
    MSE. The models may be ViTs or users' models holding one. Plus
    ``label_weight · CE(s, labels)`` when ``label_weight > 0``, plus ``extra_loss(student)``
    when given (a scalar tensor, e.g. a penalty; it is called once per step, after the forward
    passes, outside autocast). ``before_step(student, step, total_steps)`` is called before every
    step's forward pass (steps counted from 0 over the whole run), without gradients (CDCP moves
    its channel budget there, ``ChannelGates.follow_budget``). Outputs come from each model's adapter
    (``describe(model).output``), so any supported family works; the teacher runs in eval mode
    without gradients, and is left in eval mode on ``training.device``.

    ``train_data`` is either

    * a ``torch.utils.data.Dataset`` of ``(image, label)`` samples, e.g. from
      ``vitslim.io.image_sources.open_images`` (with the model's ``build_transform``) or a ``select`` subset
      of one: it is batched here, reshuffled every epoch from ``training.seed``, and decoded by
      ``workers`` processes; unreadable images (``None``) are dropped and counted as
      ``make_loader`` does; or
    * anything else iterable, taken as ready-made batches: image tensors, ``(images, labels)``
      pairs or ``make_loader``'s ``(images | None, labels, skipped)`` triples. A list or tuple
      is visited in a new order every epoch (drawn from ``seed``); any other sized iterable (a
      ``DataLoader``) is iterated as it is, and must give the same batches each time for runs to
      be reproducible. An iterable without ``len`` (a generator) is read into a list once.
      ``training.batch_size`` and ``workers`` do not apply.

    Optimisation: AdamW over the student's parameters that require grad (no weight decay on
    1-D tensors, i.e. biases and norms, nor on what a timm model lists in ``no_weight_decay``:
    position embedding and prefix tokens); the learning rate rises linearly over the first
    ``warmup_fraction`` of all steps and then follows a cosine to 0, computed per step;
    gradients are clipped to a global L2 norm of ``grad_clip`` (``None``: no clipping). On CUDA
    the forward passes run under bf16 autocast where the GPU supports it; elsewhere float32.

    With ``training.checkpoints``, every finished epoch is saved there as ``epoch-NNNN/`` (written
    atomically; the previous one is removed once the new one is in place). ``training.resume``
    continues from the latest one and ends with the same weights as an uninterrupted run; the
    hyper-parameters and data size must match the checkpoint's. Without it, earlier
    ``epoch-*`` checkpoints in the folder are removed first.
    """
    _check_options(weight_decay, temperature, label_weight, warmup_fraction, grad_clip, workers)
    if student is teacher:
        raise VitslimError("the student and the teacher are the same module; distil a compressed copy against the original")
    epochs, lr, batch_size, seed, device = training.epochs, training.lr, training.batch_size, training.seed, training.device
    student_spec, teacher_spec = describe(student), describe(teacher)
    _check_same_inputs(student_spec.preprocessing, teacher_spec.preprocessing)
    if student_spec.num_classes != teacher_spec.num_classes:
        raise VitslimError(f"the student has {student_spec.num_classes} classes and the teacher {teacher_spec.num_classes}; they must predict the same classes")
    batches = _Batches(train_data, batch_size=batch_size, workers=workers)

    student.to(device)
    teacher.to(device).eval()
    optimizer, names = _optimizer(student, lr, weight_decay)
    steps_per_epoch = len(batches)
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(warmup_fraction * total_steps)
    config = {
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "temperature": temperature,
        "label_weight": label_weight, "batch_size": batches.batch_size, "warmup_fraction": warmup_fraction,
        "grad_clip": grad_clip, "seed": seed, "data_size": batches.size, "steps_per_epoch": steps_per_epoch,
        "extra_loss": extra_loss is not None,
    }
    folder = Path(training.checkpoints) if training.checkpoints is not None else None
    start_epoch, step = 0, 0
    if folder is not None:
        if training.resume:
            start_epoch, step = checkpoints.restore_latest(folder, student, optimizer, names, config)
        elif distributed.is_main():
            checkpoints.remove_epochs(folder)
    forward = student
    if distributed.active():  # averages the gradients over ranks during backward
        forward = DistributedDataParallel(student, device_ids=[torch.device(device).index] if torch.device(device).type == "cuda" else None,
                                          find_unused_parameters=True)
    show = training.progress and distributed.is_main()

    device_type = torch.device(device).type
    use_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    index = torch.device(device).index
    rng_devices = [torch.cuda.current_device() if index is None else index] if device_type == "cuda" else []
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    check_objective(objective)
    judge = None  # the first batch's output decides "auto"
    images_this_run = 0
    with torch.random.fork_rng(devices=rng_devices), Progress("distilling", total=total_steps, unit="step", show=show,
                                                                  initial=start_epoch * steps_per_epoch) as progress:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(_epoch_seed(seed, epoch))
            _train_mode(student, student_spec)
            total, images_seen, skipped = 0.0, 0, 0
            progress.describe(f"distilling epoch {epoch + 1}/{epochs}")
            for position, (images, labels, dropped) in enumerate(batches.epoch(seed, epoch)):
                skipped += dropped
                if images is None:  # every image of the batch was unreadable
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = group["lr_scale"] * _learning_rate(epoch * steps_per_epoch + position, lr, warmup_steps, total_steps)
                images = images.to(device, non_blocking=True)
                if before_step is not None:
                    with torch.no_grad():
                        before_step(student, epoch * steps_per_epoch + position, total_steps)
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with autocast:
                    with torch.no_grad():
                        teacher_outputs = teacher_spec.output(images)
                    student_outputs = primary_output(forward(images))
                if judge is None:
                    judge = objective_for(student_spec, teacher_outputs, objective)
                loss = judge.per_image(student_outputs, teacher_outputs, temperature).mean()
                if label_weight > 0:
                    if judge.kind != "logits":
                        raise VitslimError(f"label_weight > 0 needs class logits, but the model's output is a {judge.kind} tensor")
                    loss = loss + label_weight * F.cross_entropy(student_outputs.float(), _labels(labels, student_spec.num_classes, device))
                if extra_loss is not None:
                    loss = loss + _extra(extra_loss, student)
                value = distributed.sum_numbers(float(loss.detach()))[0] / distributed.world_size()  # the one host sync of the step
                if not math.isfinite(value):
                    raise VitslimError(f"the distillation loss became {value} at epoch {epoch + 1}, step {position + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()
                step += 1
                count = images.shape[0]
                total += value * count
                images_seen += count
                images_this_run += count * distributed.world_size()
                progress.update(epoch * steps_per_epoch + position + 1 - progress.done, loss=f"{total / images_seen:.4f}",
                                **{"images/s": f"{images_this_run / progress.elapsed:.1f}"})
            if distributed.active():
                seen, dropped, total = distributed.sum_numbers(images_seen, skipped, total)
                images_seen, skipped = int(seen), int(dropped)
            if images_seen == 0:
                raise VitslimError(f"no readable images in the training data; all {skipped} failed to decode")
            logger.info(f"distill epoch {epoch + 1}/{epochs}: mean loss {total / images_seen:.4f} over {images_seen} images"
                        + (f", {skipped} unreadable skipped" if skipped else ""))
            if folder is not None:
                if distributed.is_main():
                    checkpoints.save_epoch(folder, epoch + 1, step, student, optimizer, names, config, total / images_seen)
                distributed.barrier()
    return student.eval()


# --- options ------------------------------------------------------------------------------------


def _check_options(weight_decay, temperature, label_weight, warmup_fraction, grad_clip, workers) -> None:
    checks = [
        (weight_decay >= 0, f"weight decay must be at least 0 (got {weight_decay})"),
        (temperature > 0, f"the distillation temperature must be above 0 (got {temperature})"),
        (label_weight >= 0, f"label_weight must be at least 0 (got {label_weight})"),
        (0 <= warmup_fraction < 1, f"warmup_fraction must be in [0, 1) (got {warmup_fraction})"),
        (grad_clip is None or grad_clip > 0, f"grad_clip must be above 0, or None for no clipping (got {grad_clip})"),
        (workers >= 0, f"workers must be at least 0 (got {workers})"),
    ]
    for ok, message in checks:
        if not ok:
            raise VitslimError(message)


def _check_same_inputs(student, teacher) -> None:
    """Both models see the same image tensors, so they must expect the same size and normalisation."""
    differing = [key for key in ("input_size", "mean", "std") if getattr(student, key) != getattr(teacher, key)]
    if differing:
        details = "; ".join(f"{key} {getattr(student, key)} vs {getattr(teacher, key)}" for key in differing)
        raise VitslimError(f"the student and the teacher expect different inputs ({details}); distillation feeds both the same images")


# --- data ---------------------------------------------------------------------------------------


class _Batches:
    """The training data as ``vitslim.io.image_batches.Batch``es, epoch by epoch."""

    def __init__(self, data: Dataset | Iterable, *, batch_size: int, workers: int) -> None:
        self.workers = workers
        if isinstance(data, IterableDataset):
            raise VitslimError("an IterableDataset yields samples, not batches: pass a map-style Dataset, or a DataLoader over it")
        if isinstance(data, Dataset) and isinstance(data, Sized):
            self.dataset: Dataset | None = data
            self.items: Iterable | None = None
            self.batch_size: int | None = batch_size
            self.size = len(data)
            if self.size == 0:
                raise VitslimError("the training data holds no images")
            if batch_size % distributed.world_size():
                raise VitslimError(f"the batch size {batch_size} must be a multiple of the {distributed.world_size()} processes, "
                                   "which each take an equal share of every batch")
            return
        if not isinstance(data, Iterable):
            raise VitslimError(f"training data must be a Dataset of (image, label) or an iterable of batches, not {type(data).__name__}")
        if distributed.active():
            raise VitslimError("under torchrun, pass the training data as a Dataset of (image, label), which each process samples "
                               "its share of; ready-made batches cannot be shared out")
        self.dataset, self.batch_size = None, None
        self.items = data if isinstance(data, Sized) else list(data)
        self.size = len(self.items)
        if self.size == 0:
            raise VitslimError("the training data holds no batches")

    def __len__(self) -> int:
        if self.dataset is not None:
            world = distributed.world_size()
            return math.ceil(math.ceil(self.size / world) / (self.batch_size // world))
        return self.size

    def epoch(self, seed: int, epoch: int) -> Iterable[image_batches.Batch]:
        if self.dataset is not None:
            # one process: the permutation drawn from (seed, epoch); several: every k-th entry of
            # that same permutation, so the ranks' k-th batches together are the single process's
            world = distributed.world_size()
            sampler = DistributedSampler(self.dataset, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=_epoch_seed(seed, epoch))
            yield from image_batches.make_loader(Subset(self.dataset, list(sampler)), self.batch_size // world, workers=self.workers)
            return
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        items = self.items
        if isinstance(items, (list, tuple)):
            items = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
        for batch in items:
            yield image_batches.as_batch(batch, "a training batch")


def _labels(labels, num_classes: int, device: str) -> torch.Tensor:
    """A batch's labels as a long tensor on ``device``, checked against the model's classes."""
    if labels is None:
        raise VitslimError("label_weight > 0 needs labels, but the training batches are bare image tensors")
    labels = torch.as_tensor(labels).long()
    if labels.numel() and bool((labels == image_dataset.UNLABELLED).all()):
        raise VitslimError("label_weight > 0 needs labels, but the training images are unlabelled (a plain folder of images)")
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise VitslimError(
            f"the data has label {int(labels.max())} but the model has {num_classes} classes; is this the right data set for this model?"
        )
    return labels.to(device)


# --- loss and schedule --------------------------------------------------------------------------


def _extra(extra_loss: ExtraLoss, student: nn.Module) -> torch.Tensor:
    value = extra_loss(student)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError(f"extra_loss must return a scalar tensor, got {type(value).__name__}")
    return value.reshape(()).float()


def _learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` down towards 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_sum(total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """The sum over a run's ``total_steps`` of its learning rate relative to the peak (``distill``'s
    warm-up then cosine): how far, in steps at the peak rate, AdamW moves a parameter pushed the same
    way at every step. About half the steps for any length."""
    warmup = round(warmup_fraction * total_steps)
    return sum(_learning_rate(step, 1.0, warmup, total_steps) for step in range(total_steps))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _SEED_STRIDE + epoch) % (2**63)


LR_SCALE_ATTR = "vitslim_lr_scale"


def _trained(spec) -> Callable[[str], bool]:
    """Which of the student's parameters (by name) distillation trains: all of a ViT's; of a user's
    model around a ViT only the ViT's and vitslim's own (channel gates). Compression changed the
    ViT, so that is what recovery refits; the user's head keeps its weights and, in eval mode, its
    batch-norm statistics, which a few steps of small batches would otherwise overwrite."""
    if spec.root is None:
        return lambda name: True
    own = (f"{spec.path}.", "vitslim_")
    return lambda name: name.startswith(own)


def _train_mode(student: nn.Module, spec) -> None:
    """``student.train()``, except the modules ``_trained`` leaves alone, which stay in eval mode
    (the ViT's enclosing modules keep training mode, which only their own forward reads)."""
    student.train()
    trained = _trained(spec)
    for name, module in student.named_modules():
        if name and not trained(name + ".") and not f"{spec.path}.".startswith(name + "."):
            module.training = False


def _optimizer(student: nn.Module, lr: float, weight_decay: float) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with one group per (weight decay, learning-rate scale); also the parameter names in
    optimizer order. A parameter carrying a ``vitslim_lr_scale`` attribute (pruning gates, which
    must travel much further than the weights in a short fine-tune) runs at ``lr`` times that
    scale and without weight decay. Only the parameters ``_trained`` picks are optimised."""
    spec = describe(student)
    skip = getattr(spec.model, "no_weight_decay", None)
    prefix = f"{spec.path}." if spec.root is not None else ""
    skip = {prefix + name for name in skip()} if callable(skip) else set()
    trained = _trained(spec)
    grouped: dict[tuple[float, float], list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad or not trained(name):
            continue
        scale = float(getattr(parameter, LR_SCALE_ATTR, 1.0))
        decayed = parameter.ndim > 1 and name not in skip and scale == 1.0
        grouped.setdefault((weight_decay if decayed else 0.0, scale), []).append((name, parameter))
    if not grouped:
        raise VitslimError("the student has no trainable parameters (all have requires_grad=False)")
    keys = sorted(grouped, key=lambda key: (-key[0], key[1]))
    groups = [{"params": [p for _, p in grouped[key]], "weight_decay": key[0], "lr_scale": key[1]} for key in keys]
    names = [name for key in keys for name, _ in grouped[key]]
    return torch.optim.AdamW(groups, lr=lr), names
