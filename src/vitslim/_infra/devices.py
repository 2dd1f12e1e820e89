"""Checking a ``device`` argument against what this torch build can run on, before any work."""

from __future__ import annotations

import torch

from vitslim.errors import ParameterError


def check_device(device: str | torch.device) -> torch.device:
    """``device`` parsed, when this torch build has it; else a ``ParameterError`` naming ``device``
    that says what is missing and what to use. Without it a CPU-only torch fails deep inside the
    first ``.to(device)``, after the models are loaded and the data is opened."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError("device", f"{device!r} is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise ParameterError("device", f"{device} asked for, but this torch ({torch.__version__}) {build}; use cpu, "
                                           "or install a CUDA build of torch on a machine with a GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ParameterError("device", f"{device} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ParameterError("device", f"{device} asked for, but this torch sees no Apple GPU (MPS); use cpu")
    elif parsed.type != "cpu":
        raise ParameterError("device", f"{device!r} is a device vitslim does not run on; use cpu, cuda, cuda:N or mps")
    return parsed
