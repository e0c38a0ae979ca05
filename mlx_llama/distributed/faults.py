"""Ending a distributed run cleanly instead of hanging, with one line from rank 0.

What goes wrong, and how it ends (exit status 2, `mlx_llama: error: …` on rank 0's stderr):

* a rank dies: the backend loses its connection and MLX raises in the ranks waiting on it
  (`RuntimeError: [ring] connection to a peer was lost`): `excepthook` turns that into the line;
* `mlx.launch` stops the other ranks when one fails, with SIGTERM: Python would only run a
  handler once the main thread is back from MLX, so the signal is read by the watchdog thread
  from `signal.set_wakeup_fd`'s pipe;
* a rank never connects, or a forward pass stalls (a machine gone without closing its
  sockets): the watchdog's deadline; MLX's backend setup keeps Python's lock while it waits
  for the other ranks, so there the deadline is kept by a small process (`outside_deadline`).

MLX's ring backend writes its own lines when a peer goes (`[ring] Socket 3 was closed by the
peer`, ten times): the process's native stderr is filtered (`filter_native_stderr`) so that the
error stays one line; MLX_RING_VERBOSE=1 keeps them. Ranks other than 0 print only their own
errors, marked with their rank (`RankErrors`); consequences of another rank's failure they keep
to themselves.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import threading
import time

from ..errors import MlxLlamaError

ERROR = "mlx_llama: error: "
BACKEND_ERRORS = ("[ring]", "[nccl]", "[mpi]", "[jaccl]", "[distributed]")
_reported = threading.Lock()
_stderr_fd = 2  # where fatal lines go: the real stderr, also once fd 2 is filtered


def _rank() -> int:
    return int(os.environ.get("MLX_RANK", "0") or 0)


def fatal(message: str, rank: int | None = None) -> None:
    """End the process now (exit status 2), rank 0 printing `message` as its one line. Safe
    from any thread; the first caller reports, a second one only exits."""
    if _reported.acquire(timeout=5):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        if (rank if rank is not None else _rank()) == 0:
            with contextlib.suppress(OSError):
                os.write(_stderr_fd, f"{ERROR}{message}\n".encode())
    os._exit(2)


def is_backend_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith(BACKEND_ERRORS)


class Watchdog:
    """A thread that ends the process when a deadline passes or SIGTERM arrives (see above)."""

    def __init__(self, step_timeout: float):
        self.step_timeout = step_timeout
        self.steps = False  # whether each forward pass sets a deadline (the CLI; see `watch_steps`)
        self.rank: int | None = None
        self.links = None  # `links.Links`, once the CLI opens them
        self._deadline: tuple[float, str] | None = None
        self._signal_fd: int | None = None
        threading.Thread(target=self._run, daemon=True, name="mlx_llama-watchdog").start()

    @contextlib.contextmanager
    def deadline(self, message: str, seconds: float | None = None):
        """End the process with `message` unless the block is done within `seconds`."""
        saved = self._deadline
        self._deadline = (time.monotonic() + (seconds or self.step_timeout), message)
        try:
            yield
        finally:
            self._deadline = saved

    @contextlib.contextmanager
    def paused(self):
        """No deadline inside the block (waiting for a person, not for a rank)."""
        saved, self._deadline = self._deadline, None
        try:
            yield
        finally:
            self._deadline = saved if saved is None else (time.monotonic() + self.step_timeout, saved[1])

    def beat(self) -> None:
        """A forward pass starts: the next must start within the step timeout (when watching steps)."""
        if self.steps:
            self._deadline = (time.monotonic() + self.step_timeout,
                              f"no progress for {self.step_timeout:g} s: a rank stalled or its machine is unreachable")

    def catch_sigterm(self, message: str) -> None:
        """SIGTERM ends the process with `message` even while the main thread waits in MLX.
        Main thread only (as `signal.set_wakeup_fd` requires)."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.signal(signal.SIGTERM, lambda *_: None)  # the watchdog acts; Python's default would kill silently
        signal.set_wakeup_fd(w)
        self._signal_fd, self._signal_message = r, message

    def _run(self) -> None:
        while True:
            links = self.links.sockets() if self.links is not None else []
            fds = ([self._signal_fd] if self._signal_fd is not None else []) + links
            ready, _, _ = select.select(fds, [], [], 0.25) if fds else ([], [], time.sleep(0.25))
            for fd in ready:
                if fd == self._signal_fd:
                    fatal(self._signal_message, self.rank)
                gone = self.links.closed(fd)
                if gone is not None:  # rank 0 says which rank; the others follow rank 0 out quietly
                    fatal(f"rank {gone} stopped before the end of the run (its process ended: killed, crashed, "
                          "or an error of its own)", self.rank)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline[0]:
                fatal(deadline[1], self.rank)


# The sentinel of `outside_deadline`: sleep, then end the parent (if it is still this one's).
_SENTINEL = """import os, signal, sys, time
parent, seconds, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == parent:
    os.write(2, line.encode())
    os.kill(parent, signal.SIGKILL)
"""


@contextlib.contextmanager
def outside_deadline(message: str, seconds: float):
    """End the process with `message` (rank 0) unless the block is done within `seconds`, even
    while a call holds Python's lock (MLX's backend setup), where no thread of ours can run: a
    sentinel process kills this one (status -9, 137 in a shell)."""
    line = f"{ERROR}{message}\n" if _rank() == 0 else ""
    sentinel = subprocess.Popen([sys.executable, "-S", "-c", _SENTINEL, str(os.getpid()), str(seconds), line],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        sentinel.kill()
        sentinel.wait()


def excepthook(rank: int):
    """A backend's connection error ends the run with one line (rank 0) instead of a traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if is_backend_error(value):
            # a rank that ended closed its link too: the watchdog thread (polling every 0.25 s)
            # names it and ends the process; this line is for the other cases
            time.sleep(1.0)
            fatal(f"lost the connection to another rank: it stopped or failed ({value})", rank)
        previous(kind, value, tb)

    return hook


def filter_native_stderr() -> None:
    """Route native writes to fd 2 (MLX's C++) through a thread that drops the ring backend's
    lines; Python's own stderr writes to the real stderr directly, so nothing it says waits."""
    global _stderr_fd
    if os.environ.get("MLX_RING_VERBOSE"):
        return
    _stderr_fd = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sys.stderr = open(_stderr_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)

    def forward():
        with open(r, "rb") as native:
            for line in native:
                if not line.startswith(b"[ring]"):
                    os.write(_stderr_fd, line)

    threading.Thread(target=forward, daemon=True, name="mlx_llama-stderr").start()


class RankErrors(io.TextIOBase):
    """The stderr of a rank other than 0: its own error lines, marked with its rank; nothing else
    (rank 0 prints the run's messages)."""

    def __init__(self, out, rank: int):
        self.out, self.rank, self.pending = out, rank, ""
        self.muted = False  # set for errors every rank has alike: rank 0 reports them

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(ERROR) and not self.muted:
                self.out.write(f"{ERROR}rank {self.rank}: {line[len(ERROR):]}\n")
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"


def guard_process(world) -> None:
    """What a command-line process of a distributed run needs (main thread, once): the native
    stderr filter, the excepthook, SIGTERM through the watchdog, the links to rank 0, a deadline
    on every forward pass; and on ranks other than 0: no output but their own errors, Ctrl-C
    left to rank 0. The process must call `world.watchdog.links.goodbye()` when it ends well."""
    from .links import Links

    rank = world.rank
    world.watchdog.rank = rank
    world.watchdog.steps = True
    filter_native_stderr()
    sys.excepthook = excepthook(rank)
    world.watchdog.catch_sigterm("stopped by the launcher: another rank of the run failed or was stopped")
    with world.watchdog.deadline("could not open the links between the ranks in time", world.watchdog.step_timeout + 5):
        try:
            world.watchdog.links = Links(world, world.watchdog.step_timeout)
        except OSError as e:
            raise MlxLlamaError(f"could not open the link between rank {rank} and rank 0: {e}") from None
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = RankErrors(sys.stderr, rank)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides; an interrupted rank would fall out of step
