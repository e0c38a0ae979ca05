"""A Python program that uses mlx_llama exits, even with MLX work still queued.

With OpenBLAS preloaded (`mlx_llama._blas`), a process that exits while a matmul runs on MLX's
CPU thread used to hang in OpenBLAS's exit handler (a 2048² product queued: 12 hangs in 12
exits). A decode loop always has the next step queued, so every program that stops reading
tokens exits that way; `_blas.finish_queued_work` waits for the work first.
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


@pytest.mark.skipif(not _blas.fast or sys.platform == "darwin", reason="OpenBLAS is not installed (libopenblas0)")
def test_exit_with_a_matmul_queued():
    for _ in range(3):
        # OpenBLAS's worker threads (the suite runs with one BLAS thread per process: none)
        r = run_watched([sys.executable, "-c", QUEUED_AT_EXIT], timeout=60, env=dict(os.environ, OPENBLAS_NUM_THREADS="2"))
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
