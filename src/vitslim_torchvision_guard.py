"""Let ``import torchvision`` (and so ``import timm``) succeed when torchvision's C++ ops did not load.

A torchvision wheel built for another torch (the registry's torchvision 0.28.0 is a CUDA build;
``scripts/setup.sh`` pins CPU torch 2.13.0 beside it) cannot load its extension. Its ``import``
then dies in ``torchvision._meta_registrations`` with ``RuntimeError: operator torchvision::nms
does not exist``: that module registers fake kernels for ``nms`` and ``qnms`` without checking
that the extension defined them (its other registrations check). Nothing vitslim or timm uses
needs those detection ops.

``install()`` puts a finder first on ``sys.meta_path``. Just before ``_meta_registrations`` runs,
it declares a placeholder schema for each operator that module registers unconditionally and that
is not defined; calling a placeholder fails with "no kernel", the honest answer for an op whose
extension did not load. With a matching torchvision every op is defined and nothing is declared.

This is a top-level module, apart from the ``vitslim`` package, because ``scripts/setup.sh``
installs a ``.pth`` file that calls ``install()`` at every start of the venv's interpreter, so
that a user script importing timm before vitslim works too; importing the ``vitslim`` package
there would import torch and timm into every Python process. Nothing heavy is imported here
until torchvision itself is.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
from pathlib import Path

_GUARDED = "torchvision._meta_registrations"
# how _meta_registrations.py registers a fake kernel without checking that the extension loaded
_UNCONDITIONAL = re.compile(r"""register_fake\(\s*["']torchvision::(\w+)["']""")
# nms and qnms share this signature (the only unconditional registrations in torchvision 0.2x)
_SIGNATURE = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

placeholders: list[str] = []  # the operators declared in this process, in order
_library = None  # kept alive for the life of the process: dropping a Library deletes its definitions


class _Finder:
    """Finds ``torchvision._meta_registrations`` as the path finder does, declaring what it needs first."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            declare_missing(Path(spec.origin).read_text(encoding="utf-8"))
        return spec


def declare_missing(source: str) -> list[str]:
    """Declare a placeholder for each operator ``source`` registers a fake kernel for without
    checking, that is not defined yet; the names declared now."""
    import torch

    global _library
    declared = []
    for op in dict.fromkeys(_UNCONDITIONAL.findall(source)):
        if hasattr(torch.ops.torchvision, op):
            continue
        if _library is None:
            _library = torch.library.Library("torchvision", "DEF")
        _library.define(f"{op}{_SIGNATURE}")
        placeholders.append(op)
        declared.append(op)
    return declared


def install() -> None:
    """Guard every later ``import torchvision`` in this process (idempotent)."""
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
