"""Runs across processes through ``torch.distributed``, launched with ``torchrun``.

vitslim uses an existing engine rather than its own: one process per device, a process group
(NCCL on GPUs, gloo on CPUs), and four collective patterns.

* **Calibration**: every rank holds the same (small) list of calibration batches and processes
  the batches whose index falls to it (``owns``); Gram matrices, Fisher sums and the paired
  statistics of compensation are then summed over ranks (``all_reduce_sum``), so every rank fits
  the same factors, equal to a single process's up to the order of float summation.
* **Distillation**: the student is wrapped in ``DistributedDataParallel`` and each rank reads
  its share of every global batch through a ``DistributedSampler`` (see ``vitslim.train``).
* **Evaluation**: each rank scores its shard of the images; the counts are summed.
* **Outputs and timings**: only rank 0 writes files or times models (``on_main``); others wait
  and receive what rank 0 measured, so decisions taken from timings agree on every rank.

Outside ``torchrun`` (no process group) every helper is the identity: one process, rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def owns(index: int) -> bool:
    """Whether this rank processes item ``index`` of a sequence every rank holds."""
    return index % world_size() == rank()


def init_from_environment() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    NCCL with this rank's GPU (``LOCAL_RANK``) made current when CUDA is available, gloo
    otherwise. A no-op outside ``torchrun``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def shutdown(*, clean: bool) -> None:
    """Leave the process group in order: after a run that ended ``clean`` on every rank, wait for
    all ranks at a barrier, then tear the group down before the interpreter exits. Left to
    interpreter exit, gloo's threads were torn down while the other rank still used them, and one
    ``torchrun`` run in five aborted (SIGABRT, "terminate called without an active exception")
    after its work was done. After an error there is no barrier: another rank may never reach it.
    A no-op outside ``torchrun``."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returned for convenience. NCCL reduces only CUDA
    tensors, so a CPU tensor travels through this rank's GPU there."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_numbers(*values: float) -> list[float]:
    """Python numbers summed over ranks (as float64, exact for counts below 2**53)."""
    if not active():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def on_main(function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0 only and give its (picklable) result to every rank. Rank 0's
    error is raised on every rank, so none is left waiting."""
    if not active():
        return function()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", function())
        except Exception as error:  # handed to the other ranks, then re-raised here
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def barrier() -> None:
    if active():
        dist.barrier()
