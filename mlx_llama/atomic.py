"""Writing a directory all at once: into a temporary directory beside it, then renamed into place.

A process killed at any point leaves either the old complete directory or the new complete one
(and perhaps a `.NAME.partial-*` directory beside it, never read). Where the old one is
replaced, the two are swapped in one step by Linux's `renameat2(RENAME_EXCHANGE)`; elsewhere
the old one is first renamed aside (a kill between the two renames leaves it at
`.NAME.old-*`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import MlxLlamaError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def check_target(out, force: bool) -> None:
    """Refuse to replace an existing `out` (an empty directory does not count) without `force`."""
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        return
    if os.path.lexists(out) and not force:
        raise MlxLlamaError(f"{out} already exists (pass --force to replace it)")


def write_dir(out, write: Callable[[Path], None], force: bool = False) -> None:
    """Call `write(tmp)` to fill a new directory, then make it `out` in one step."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        _sync(tmp)  # the files' bytes reach the disk before the rename that publishes them
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old ones after a swap


def _sync(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an old `out` ends up at `tmp` (removed by the caller) or is removed here."""
    if not os.path.lexists(out) or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # atomic; replaces an empty directory
        return
    if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    os.replace(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ≥ 3.15, glibc ≥ 2.28); False where that is not possible."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))
