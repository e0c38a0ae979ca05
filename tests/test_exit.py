"""A Python program that uses mlx_llama exits (and forks), even with MLX work still queued.

With OpenBLAS preloaded (`mlx_llama._blas`), a process that exits while a matmul runs on MLX's
CPU thread used to hang in OpenBLAS's exit handler (a 2048² product queued: 12 hangs in 12
exits), and one that forked, in its fork handler (3 in 4). A decode loop always has the next
step queued, so every program that stops reading tokens exits that way;
`_blas.finish_queued_work` waits for the work first.
"""

from __future__ import annotations

import os
import sys

import pytest

from mlx_llama import _blas
from watched import run_watched

QUEUED_AT_EXIT = """
import mlx_llama, mlx.core as mx
a = mx.random.normal((2048, 2048))
mx.eval(a)
mx.async_eval((a @ a) @ a)  # still running when the program ends
"""
FORK_WITH_WORK_QUEUED = QUEUED_AT_EXIT + """
import os
pid = os.fork()  # OpenBLAS's fork handler stops its threads as its exit handler does
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not _blas.fast or sys.platform == "darwin", reason="OpenBLAS is not installed (libopenblas0)")
@pytest.mark.parametrize("program", [QUEUED_AT_EXIT, FORK_WITH_WORK_QUEUED], ids=["exit", "fork"])
def test_a_matmul_queued(program):
    # OpenBLAS's worker threads: the suite runs with one BLAS thread per process, which has none
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    for _ in range(3):
        r = run_watched([sys.executable, "-c", program], timeout=60, env=env)
        assert r.returncode == 0, r.stderr[-2000:]


def test_generation_stopped_early_then_exit(smollm2_path):
    """As a user's script ends: tokens read until it has enough, the next step still queued."""
    program = (
        "import mlx_llama\n"
        f"model, tok = mlx_llama.load({str(smollm2_path)!r})\n"
        "for i, piece in enumerate(mlx_llama.stream_generate(model, tok, 'Once upon a time', 64, temp=0)):\n"
        "    if i == 3:\n"
        "        break\n"
        "print('done')\n"
    )
    r = run_watched([sys.executable, "-c", program], timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
