"""The processes of a run: MLX's communication group, the backend it runs on, and the few
collective steps the distributed models share.

Every collective here is called by every rank, in the same order: that is what keeps the ranks
in step. A value that only one rank has (the sampled token, a chat line typed on rank 0) reaches
the others through an `all_sum` to which they add zeros — exact (x + 0 = x), and available on
every backend, NCCL included, which has no send/recv in MLX.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import mlx.core as mx

from ..errors import MlxLlamaError
from .faults import Watchdog, outside_deadline

# mx.distributed.init("any") tries NCCL (with CUDA), then ring, MPI, JACCL; we do the same, one
# by one, so that we know which backend answered (NCCL: see `point_to_point`). NCCL is tried only
# where `mlx.launch --backend nccl` set it up: MLX's NCCL setup raises when its variables are unset.
BACKENDS = ("ring", "mpi", "jaccl")
DEFAULT_TIMEOUT = 120.0  # seconds: connecting, and any one forward pass (MLX_LLAMA_DIST_TIMEOUT)


class SameOnEveryRank(MlxLlamaError):
    """An error every rank raises alike (a refused split, different files on the ranks): only
    rank 0 reports it."""


@dataclass
class World:
    group: mx.distributed.Group
    backend: str  # "ring", "mpi", "jaccl", "nccl"; "" for a single process
    watchdog: Watchdog

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def point_to_point(self) -> bool:
        """Whether send/recv and all_gather are used: MLX's NCCL backend had only all_sum in
        some versions, so there everything goes through all_sum (MLX_LLAMA_ALL_SUM_ONLY=1: on
        any backend, as the tests do to run NCCL's path on CPUs)."""
        return self.backend != "nccl" and not os.environ.get("MLX_LLAMA_ALL_SUM_ONLY")

    def all_gather(self, x: mx.array) -> mx.array:
        """Every rank's `x` (the same shape on each), stacked in rank order: (ranks, *x.shape)."""
        if self.point_to_point:
            return mx.distributed.all_gather(x[None], group=self.group)
        mine = mx.arange(self.size).reshape(-1, *[1] * x.ndim) == self.rank  # x in this rank's row, zeros elsewhere
        return mx.distributed.all_sum(mx.where(mine, x[None], mx.zeros_like(x)[None]), group=self.group)

    def share(self, x: mx.array, root: int = 0) -> mx.array:
        """`x` as rank `root` has it, on every rank. On the others `x` only gives the shape and
        dtype, and orders the exchange after whatever computed it."""
        if self.rank != root:
            x = mx.depends(mx.zeros(x.shape, x.dtype), x)
        return mx.distributed.all_sum(x, group=self.group)

    def share_text(self, text: str | None) -> str | None:
        """Rank 0's `text` (None: end of input) on every rank; the others pass None."""
        data = text.encode("utf-8") if self.rank == 0 and text is not None else b""
        n = len(data) if self.rank == 0 and text is not None else -1
        with self.watchdog.paused():  # the others wait for a person typing on rank 0
            n = self.share(mx.array([n], mx.int32)).item()
        if n <= 0:
            return None if n < 0 else ""
        codes = mx.array(list(data), mx.int32) if self.rank == 0 else mx.zeros((n,), mx.int32)
        return bytes(self.share(codes).tolist()).decode("utf-8")

    def agree(self, values: tuple[int, ...], what: str) -> None:
        """Check that every rank has the same `values` (one collective); `what` names them."""
        local = mx.array(list(values), mx.int32)
        rows = self.all_gather(local).tolist()
        for rank, row in enumerate(rows):
            if row != rows[0]:
                raise SameOnEveryRank(f"rank {rank} has a different {what} than rank 0")


def fingerprint(*parts) -> tuple[int, int]:
    """Two int32 words that differ, with near certainty, when the parts' reprs differ."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little", signed=True) for i in (0, 4))


def connect(timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the run started by `mlx.launch` (or by setting the backend's variables by hand); a
    single process when there is none. A rank that cannot reach the others within `timeout`
    seconds ends with a one-line error instead of waiting forever."""
    watchdog = Watchdog(timeout)
    backends = (("nccl",) if mx.cuda.is_available() and os.environ.get("NCCL_HOST_IP") else ()) + BACKENDS
    message = f"could not connect to the other ranks within {timeout:g} s (did every rank start, with the same hostfile?)"
    with outside_deadline(message, timeout + 1), watchdog.deadline(message):  # the first that can act
        for backend in backends:
            try:  # an unconfigured backend gives a group of one; a misconfigured one raises
                group = mx.distributed.init(strict=False, backend=backend)
            except (RuntimeError, ValueError) as e:
                raise MlxLlamaError(f"the {backend} backend could not start: {e}") from None
            if group.size() > 1:
                return World(group, backend, watchdog)
    return World(group, "", watchdog)
