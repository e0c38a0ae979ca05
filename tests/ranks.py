"""Start the ranks of a distributed run on this machine, as `mlx.launch --backend ring` does
(each rank a process with MLX_RANK and a hostfile of localhost ports), but with each rank's
stdout and stderr kept apart, so that tests can read rank 0's alone.

    run = Ranks(["-m", "mlx_llama", "generate", "--pipeline", ...], n=2)   # `python ARGS` per rank
    run.wait(timeout=300)                                  # → [(returncode, stdout, stderr), ...]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def rank_env(rank: int, hostfile: str, extra: dict | None = None) -> dict:
    env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=hostfile, PYTHONPATH=str(ROOT),
               # ranks share 2 cores here: one BLAS thread each, or they fight over them
               OPENBLAS_NUM_THREADS="1")
    env.pop("MLX_RING_VERBOSE", None)
    return {**env, **(extra or {})}


class Ranks:
    def __init__(self, args: list[str], n: int, *, env: dict | None = None, stdin: str | None = None, cwd=None,
                 hostfile_ranks: int | None = None):
        """stdin: rank 0's standard input (the others' is empty); cwd: the ranks' working
        directory, or a list of one per rank; hostfile_ranks: the ranks the hostfile lists
        (default n: start fewer to leave ranks missing)."""
        self.dir = tempfile.TemporaryDirectory(prefix="ranks-")
        hostfile = os.path.join(self.dir.name, "hosts.json")
        with open(hostfile, "w") as fh:
            json.dump([[f"127.0.0.1:{p}"] for p in free_ports(hostfile_ranks or n)], fh)
        self.files, self.procs = [], []
        for rank in range(n):
            out, err = (open(os.path.join(self.dir.name, f"{rank}.{k}"), "w+") for k in ("out", "err"))
            self.files.append((out, err))
            given = subprocess.PIPE if rank == 0 and stdin is not None else subprocess.DEVNULL
            self.procs.append(subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, stdin=given,
                                               env=rank_env(rank, hostfile, env), text=True,
                                               cwd=(cwd[rank] if isinstance(cwd, list) else cwd) or self.dir.name))
            if given == subprocess.PIPE:
                self.procs[-1].stdin.write(stdin)
                self.procs[-1].stdin.close()

    def output(self, rank: int) -> tuple[str, str]:
        out, err = self.files[rank]
        out.flush(), err.flush()
        return Path(out.name).read_text(), Path(err.name).read_text()

    def wait_for_output(self, rank: int, chars: int, timeout: float) -> None:
        """Until rank `rank` has printed `chars` characters to stdout."""
        end = time.monotonic() + timeout
        while len(self.output(rank)[0]) < chars:
            if time.monotonic() > end or self.procs[rank].poll() is not None:
                raise AssertionError(f"rank {rank} printed {self.output(rank)!r}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> list[tuple[int, str, str]]:
        end = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(0.1, end - time.monotonic()))
        finally:
            self.kill()
        return [(p.returncode, *self.output(r)) for r, p in enumerate(self.procs)]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
