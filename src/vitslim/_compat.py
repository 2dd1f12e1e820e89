"""Import guards for third-party packages whose builds may not match the installed torch.

timm imports torchvision for its data transforms. A torchvision wheel built for another torch
(for example a CUDA torchvision beside a CPU torch) cannot load its C++ extension, and its
``import`` then dies with ``RuntimeError: operator torchvision::nms does not exist``.
``vitslim_torchvision_guard`` (a top-level module, so that the ``.pth`` file ``scripts/setup.sh``
installs can run it at interpreter start without importing vitslim) declares placeholders for
the missing operators; here vitslim installs the same guard for itself, in environments set up
without that file, and says once when it was needed. Any other import error propagates unchanged.
"""

from __future__ import annotations

import logging

import vitslim_torchvision_guard as guard


def import_torchvision():
    """Import torchvision with the guard installed (see module doc)."""
    guard.install()
    before = len(guard.placeholders)
    import torchvision

    if len(guard.placeholders) > before:  # declared by this import: report it once
        logging.getLogger("vitslim").info(
            "torchvision does not match the installed torch build (its C++ ops did not load); "
            f"vitslim declared placeholders for {', '.join(guard.placeholders[before:])} so timm can import. "
            "Detection ops such as torchvision.ops.nms will not work in this process."
        )
    return torchvision


def import_timm():
    """Import timm after making sure torchvision imports (see module doc)."""
    import_torchvision()
    import timm

    return timm
