"""Write a whole output folder or file, or nothing: build it under a temporary name, then rename it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vitslim.errors import VitslimError


def staging_folder(target: Path) -> Path:
    """A new empty folder beside ``target`` (so the final rename stays on one file system)."""
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    except OSError as error:
        raise VitslimError(f"cannot write to {parent}: {error.strerror}; choose a writable output folder") from None


def check_writable(target: Path) -> None:
    """Fail now, with a clear error, if ``target`` could not be written later."""
    staging_folder(target).rmdir()


def atomic_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill`` on an empty staging folder beside ``target``, then move it into place.

    An exception (or Ctrl-C) inside ``fill`` removes the staging folder and leaves any previous
    ``target`` untouched, so an interrupted run never leaves a half-written output behind.
    """
    staging = staging_folder(target)
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def atomic_file(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write`` on a temporary path beside ``target`` (same suffix, so tools that infer a
    format from it still work), then rename it to ``target``. If ``write`` raises, the temporary
    file goes and any previous ``target`` is left untouched."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitslimError(f"cannot write to {target.parent}: {error.strerror}; choose a writable output path") from None
    partial = target.with_name(f".{target.stem}.partial{target.suffix}")
    try:
        write(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
