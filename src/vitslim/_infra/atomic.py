"""Write a whole output folder or file, or nothing: build it under a temporary name, then rename it.

Temporary names come from ``tempfile`` (unique per call), so two runs writing the same output
never share one. ``tempfile`` makes them owner-only (0700 folders, 0600 files), and safetensors
writes its files 0600 too; before the rename every output gets the permissions the user's umask
gives a file or folder made the ordinary way (0644/0755 under the usual 022), so that a saved
model is as readable as the rest of what the user writes.

``claimed`` guards an output that a long run will write at its end: a second run aiming at the
same output fails at its start, rather than both succeeding and the last silently replacing the
first's result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vitslim.errors import VitslimError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _as_if_made_plainly(path: Path) -> None:
    """Add the permission bits the umask grants a new file (0666) or folder (0777), to ``path`` and
    everything below it; bits already set stay."""
    allowed = ~_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        mode = item.lstat().st_mode
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            os.chmod(item, stat.S_IMODE(mode) | ((0o777 if stat.S_ISDIR(mode) else 0o666) & allowed))


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

    An exception, Ctrl-C or (under the CLI) SIGTERM inside ``fill`` removes the staging folder and
    leaves any previous ``target`` untouched, so an interrupted run never leaves a half-written
    output behind.
    """
    staging = staging_folder(target)
    try:
        fill(staging)
        _as_if_made_plainly(staging)
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
        handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{target.suffix}", dir=target.parent)
    except OSError as error:
        raise VitslimError(f"cannot write to {target.parent}: {error.strerror}; choose a writable output path") from None
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        _as_if_made_plainly(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def claimed(target: Path) -> Iterator[None]:
    """Hold ``target`` for this process while the block runs: a lock file beside it
    (``.NAME.vitslim-lock``, holding the process id) made exclusively, removed at the end. Another
    live process holding it is a ``VitslimError``; a lock left by a process that no longer runs
    (killed outright) is taken over."""
    target = Path(target)
    lock = target.resolve().parent / f".{target.name}.vitslim-lock"
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _running(holder):
                raise VitslimError(f"another vitslim run (process {holder}) is writing {target}; wait for it to finish, "
                                   f"or choose another output (remove {lock} if that process is not vitslim)") from None
            lock.unlink(missing_ok=True)  # left by a run that was killed outright
            continue
        except OSError as error:
            raise VitslimError(f"cannot write to {lock.parent}: {error.strerror}; choose a writable output folder") from None
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        break
    else:
        raise VitslimError(f"cannot claim {target}: {lock} keeps reappearing; is another vitslim run starting on it?")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
