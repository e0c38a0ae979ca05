"""Output that appears whole or not at all.

A conversion writes into `.NAME.partial-PID` next to its destination and renames it into place
at the end (a rename within one directory is atomic), so an interrupted or failed conversion
leaves the destination as it was: no half-written file or directory under the name a user
asked for. Ctrl-C and SIGTERM (made an exception by `signals_as_interrupts`) remove the
partial output on the way out; after SIGKILL it stays, hidden, and the next conversion to the
same destination removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from ..errors import MlxLlamaError

PARTIAL = ".partial-"


class OutputExists(MlxLlamaError):
    def __init__(self, path):
        super().__init__(f"{path}: exists (pass --force to replace it)")


@contextlib.contextmanager
def atomic_output(dest, *, force: bool = False, directory: bool = False):
    """Yields the temporary path to write (a new empty directory when `directory`), then moves it
    to `dest`. Refuses an existing `dest` unless `force`; on any exception (KeyboardInterrupt
    included) the temporary path is removed and `dest` left untouched."""
    dest = Path(dest)
    if (dest.exists() or dest.is_symlink()) and not force:
        raise OutputExists(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    tmp = dest.with_name(f".{dest.name}{PARTIAL}{os.getpid()}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, dest: Path) -> None:
    if not dest.is_dir() or dest.is_symlink():
        os.replace(tmp, dest)  # a file (or nothing) at dest: replaced in one step
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _remove_stale(dest: Path) -> None:
    """Partial outputs for `dest` left by conversions that were killed (their process is gone)."""
    for p in dest.parent.glob(f".{dest.name}{PARTIAL}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM raises KeyboardInterrupt while inside, so that partial output is cleaned up as
    for Ctrl-C (the default action would end the process on the spot)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
