"""A TCP link from every rank to rank 0, so that a rank that ends without saying goodbye ends
the run at once.

MLX's backends notice a dead peer only on the socket they are using at that moment: with three
ranks on the ring, the two survivors can end up waiting on each other forever. So each rank also
keeps a plain TCP connection to rank 0, watched by the watchdog thread (`faults.Watchdog`): when
a rank's process ends, the kernel closes its connection, and rank 0 reports it and ends the
run; the others end when rank 0's connection closes. A rank that leaves normally first says
`BYE` (`Links.goodbye`), so that its closing is not taken for a failure.

Rank 0 listens on an ephemeral port (MLX_LLAMA_LINK_PORT fixes it), which it tells the others
through the group; they find rank 0's address where the launcher put it: the ring's hostfile,
NCCL_HOST_IP, or JACCL's coordinator (MLX_LLAMA_RANK0_HOST overrides it).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import mlx.core as mx

BYE = b"BYE"


def rank0_host() -> str | None:
    """Rank 0's address as the launcher gave it (None: unknown, e.g. under MPI)."""
    if os.environ.get("MLX_LLAMA_RANK0_HOST"):
        return os.environ["MLX_LLAMA_RANK0_HOST"]
    if os.environ.get("NCCL_HOST_IP"):
        return os.environ["NCCL_HOST_IP"]
    if os.environ.get("MLX_JACCL_COORDINATOR"):
        return os.environ["MLX_JACCL_COORDINATOR"].rsplit(":", 1)[0]
    try:
        with open(os.environ["MLX_HOSTFILE"]) as fh:
            return json.load(fh)[0][0].rsplit(":", 1)[0]
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return None


class Links:
    """This rank's end of the links: rank 0 holds one socket per other rank, the others one."""

    def __init__(self, world, timeout: float):
        self.rank = world.rank
        self.peers: dict[socket.socket, int] = {}  # socket → the rank at its other end
        self.leaving: set[int] = set()  # ranks that said goodbye
        host = rank0_host() if world.rank != 0 else None
        listener = self._listen() if world.rank == 0 else None
        # one collective: rank 0's port, and how many ranks cannot tell where rank 0 is
        mine = [listener.getsockname()[1], 0] if listener else [0, int(host is None)]
        port, lost = mx.distributed.all_sum(mx.array(mine, mx.int32), group=world.group).tolist()
        self.active = lost == 0  # all or none: a link that some ranks lack would end the run at once
        if not self.active:
            if listener:
                listener.close()
            return
        end = time.monotonic() + timeout
        if world.rank == 0:
            self._accept(listener, world.size - 1, end)
        else:
            self._connect(host, port, end)

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(os.environ.get("MLX_LLAMA_LINK_PORT", "0") or 0)))
        s.listen()
        return s

    def _accept(self, listener: socket.socket, n: int, end: float) -> None:
        while len(self.peers) < n:
            listener.settimeout(max(0.1, end - time.monotonic()))
            conn, _ = listener.accept()  # socket.timeout past the deadline: the caller's watchdog reports
            conn.settimeout(max(0.1, end - time.monotonic()))
            (rank,) = struct.unpack("<i", _read(conn, 4))
            conn.setblocking(True)
            self.peers[conn] = rank
        listener.close()

    def _connect(self, host: str, port: int, end: float) -> None:
        while True:
            try:
                conn = socket.create_connection((host, port), timeout=max(0.1, end - time.monotonic()))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        conn.sendall(struct.pack("<i", self.rank))
        conn.setblocking(True)
        self.peers[conn] = 0

    def sockets(self) -> list[socket.socket]:
        return list(self.peers)

    def closed(self, conn: socket.socket) -> int | None:
        """Read what arrived on `conn`: the peer's rank if it ended without goodbye, else None."""
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        rank = self.peers[conn]
        if BYE in data:
            self.leaving.add(rank)
        if data:
            return None
        del self.peers[conn]
        conn.close()
        return None if rank in self.leaving else rank

    def goodbye(self) -> None:
        """This rank leaves normally: its closing connections are not a failure."""
        for conn in self.sockets():
            try:
                conn.sendall(BYE)
            except OSError:
                pass


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("a rank closed its link before saying which rank it is")
        data += chunk
    return data
