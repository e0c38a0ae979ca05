"""On MLX's CUDA backend: the speed of the Q2_K/Q6_K kernels (`mlx_llama.cuda_kernels`) on a
7B-sized Q6_K tensor, and whether MLX's float32 GPU matmuls run as TF32. Their exactness is
tested by `tests/test_cuda_kernels.py`.

    python scripts/check_cuda_kernels.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_load import T_Q6_K, random_blocks  # noqa: E402
from mlx_llama import cuda_kernels, quants  # noqa: E402


def timed(fn, reps: int = 50) -> float:
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps


def main() -> int:
    assert cuda_kernels.available(), "needs MLX's CUDA backend"
    # MLX's own float32 GPU matmuls against float64 (is TF32 in play?)
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((16, 4096)).astype(np.float32), rng.standard_normal((1024, 4096)).astype(np.float32)
    exact = a.astype(np.float64) @ w.T.astype(np.float64)
    dense = np.array(mx.array(a) @ mx.array(w).T)
    wq, sc, bi = mx.quantize(mx.array(w), group_size=32, bits=4)
    wdq = np.array(mx.dequantize(wq, sc, bi, group_size=32, bits=4)).astype(np.float64)
    for label, x in (("1 row", a[:1]), ("16 rows", a)):
        q = np.array(mx.quantized_matmul(mx.array(x), wq, sc, bi, transpose=True, group_size=32, bits=4))
        print(f"MLX GPU float32 quantized_matmul ({label}): max relative error {np.abs(q - x.astype(np.float64) @ wdq.T).max() / np.abs(q).max():.2e}")
    print(f"MLX GPU float32 matmul: max relative error {np.abs(dense - exact).max() / np.abs(exact).max():.2e} (float32 ≈ 1e-7, TF32 ≈ 1e-3)")

    # speed on a 7B ffn_down-sized Q6_K tensor (4096 × 11008)
    rows, cols = 4096, 11008
    blocks = random_blocks(rng, rows, cols, T_Q6_K).reshape(rows, cols // 256, -1)
    fields = quants.split_blocks(quants.Q6_K, blocks).fields
    dense = cuda_kernels.dequantize(quants.Q6_K, fields, mx.float16)
    x = mx.random.normal((1, 1, cols)).astype(mx.float16)
    mx.eval(dense, x)
    blocks_bytes = sum(v.nbytes for v in fields.values())
    cases = [
        ("dense float16 matmul", lambda: x @ dense.T, dense.nbytes),
        ("blocks: MLX ops dequantize + matmul", lambda: x @ quants.dequantize_blocks(quants.Q6_K, fields, mx.float16).T, blocks_bytes),
        ("blocks: CUDA dequantize + matmul", lambda: x @ cuda_kernels.dequantize(quants.Q6_K, fields, mx.float16).T, blocks_bytes),
        ("blocks: CUDA matvec", lambda: cuda_kernels.block_matvec(x, quants.Q6_K, fields), blocks_bytes),
    ]
    for label, fn, nbytes in cases:
        s = timed(fn)
        print(f"Q6_K 4096×11008, one token, {label:38}: {s * 1e6:8.1f} µs  ({nbytes / s / 1e9:6.0f} GB/s of weights read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
