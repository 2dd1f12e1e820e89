"""Import guards for third-party packages whose builds may not match the installed torch.

timm imports torchvision for its data transforms. A torchvision wheel built for another torch
(for example a CUDA torchvision beside a CPU torch) cannot load its C++ extension, and its
``import`` then dies in ``torchvision._meta_registrations`` with
``RuntimeError: operator torchvision::nms does not exist``: the module registers fake kernels
for ``nms``/``qnms`` without checking that the extension defined them. Nothing vitslim uses
needs those detection ops, so on exactly that error we declare placeholder schemas for the
missing operators and import again. Any other error propagates unchanged.
"""

from __future__ import annotations

import logging
import re
import sys

import torch

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
# Kept alive for the life of the process: dropping a Library object deletes its definitions.
_placeholder_library: torch.library.Library | None = None
_placeholders: list[str] = []


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _declare_placeholder(op_name: str) -> None:
    global _placeholder_library
    if _placeholder_library is None:
        _placeholder_library = torch.library.Library("torchvision", "DEF")
    # nms and qnms share this signature; calling a placeholder fails with "no kernel", which is
    # the honest answer for an op whose extension did not load.
    _placeholder_library.define(f"{op_name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _placeholders.append(op_name)


def import_torchvision():
    """Import torchvision, working around a torch/torchvision build mismatch (see module doc)."""
    declared_here = False  # report the workaround once, from the call that made it
    for _ in range(8):
        try:
            import torchvision

            if declared_here:
                logging.getLogger("vitslim").info(
                    "torchvision does not match the installed torch build (its C++ ops did not load); "
                    f"vitslim declared placeholders for {', '.join(_placeholders)} so timm can import. "
                    "Detection ops such as torchvision.ops.nms will not work in this process."
                )
            return torchvision
        except RuntimeError as error:
            missing = _MISSING_OP.search(str(error))
            if missing is None or missing.group(1) in _placeholders:
                raise
            _forget_torchvision()
            _declare_placeholder(missing.group(1))
            declared_here = True
    raise RuntimeError("torchvision still fails to import after declaring placeholder operators")


def import_timm():
    """Import timm after making sure torchvision imports (see module doc)."""
    import_torchvision()
    import timm

    return timm
