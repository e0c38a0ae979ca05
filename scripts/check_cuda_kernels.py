"""On MLX's CUDA backend: the speed of mlx_llama's matvec kernels on 7B-sized weights — MLX's
affine 4-bit form (`cuda_affine`) against MLX's own quantized_matmul, and the Q6_K blocks
(`cuda_kernels`) — as GB/s of weights read, and whether MLX's float32 GPU matmuls run as TF32.
Their exactness is tested by `tests/test_cuda_kernels.py`.

    python scripts/check_cuda_kernels.py [TILES.env]

Each kernel is timed under several tilings (warps per block, rows per block, unroll); with a file
argument the fastest are written there as MLX_LLAMA_AFFINE_TILE / MLX_LLAMA_Q6_K_TILE exports.
"""

from __future__ import annotations

import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_load import T_Q6_K, random_blocks  # noqa: E402
from mlx_llama import cuda_affine, cuda_kernels, quants  # noqa: E402


def timed(fn, reps: int = 50) -> float:
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps


AFFINE_TILES = [(1, 1, 4), (1, 2, 2), (1, 4, 2), (2, 4, 2), (1, 8, 1)]
Q6_K_TILES = [(4, 1), (4, 2), (2, 4), (1, 4)]


def sweep(label, tiles, module, names, fn, n, nbytes, totals=None):
    """Times `fn` under each tiling (module attributes `names`); returns the fastest."""
    saved = [getattr(module, k) for k in names]
    best, best_s = None, float("inf")
    for tile in tiles:
        for k, v in zip(names, tile):
            setattr(module, k, v)
        s = timed(fn, reps=10)
        if totals is not None:
            totals[tile] = totals.get(tile, 0.0) + s / n
        print(f"  {label} tile {tile}: {s / n * 1e6:7.1f} µs ({nbytes / s / 1e9:5.0f} GB/s)")
        if s < best_s:
            best, best_s = tile, s
    for k, v in zip(names, saved):
        setattr(module, k, v)
    return best


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

    # speed on 7B ffn_down-sized Q6_K tensors (4096 × 11008): 8 distinct ones (300 MB, beyond the
    # 60 MB L2) in one evaluation
    rows, cols, n = 4096, 11008, 8
    tensors = []
    for _ in range(n):
        blocks = random_blocks(rng, rows, cols, T_Q6_K).reshape(rows, cols // 256, -1)
        fields = quants.split_blocks(quants.Q6_K, blocks).fields
        tensors.append((fields, cuda_kernels.dequantize(quants.Q6_K, fields, mx.float16)))
    x = mx.random.normal((1, 1, cols)).astype(mx.float16)
    mx.eval(tensors, x)
    blocks_bytes = n * sum(v.nbytes for v in tensors[0][0].values())
    cases = [
        ("dense float16 matmul", lambda: [x @ d.T for _, d in tensors], n * tensors[0][1].nbytes),
        ("blocks: MLX ops dequantize + matmul", lambda: [x @ quants.dequantize_blocks(quants.Q6_K, f, mx.float16).T for f, _ in tensors], blocks_bytes),
        ("blocks: CUDA dequantize + matmul", lambda: [x @ cuda_kernels.dequantize(quants.Q6_K, f, mx.float16).T for f, _ in tensors], blocks_bytes),
        ("blocks: CUDA matvec", lambda: [cuda_kernels.block_matvec(x, quants.Q6_K, f) for f, _ in tensors], blocks_bytes),
    ]
    for label, fn, nbytes in cases:
        s = timed(fn, reps=10)
        print(f"Q6_K 4096×11008, one token (×{n}), {label:38}: {s / n * 1e6:8.1f} µs  ({nbytes / s / 1e9:6.0f} GB/s of weights read)")
    q6_best = sweep("Q6_K blocks matvec 4096×11008", Q6_K_TILES, cuda_kernels, ("Q6_K_WARPS", "Q6_K_ROWS"),
                    lambda: [cuda_kernels.block_matvec(x, quants.Q6_K, f) for f, _ in tensors], n, blocks_bytes)

    # MLX's affine 4-bit group 32 (Q4_0, Q4_K) at the 7B shapes: q/k/v/o, gate/up, down, output, q+k+v
    # fused. Several distinct matrices (~400 MB together, beyond the 60 MB L2) in one evaluation,
    # as in a decode step, so neither the cache nor one launch's overhead decides the figure.
    totals: dict = {}
    for rows, cols in ((4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (12288, 4096)):
        n = max(2, int(400e6 // (rows * cols * 5 / 8)))
        mats = [mx.quantize(mx.random.normal((rows, cols)) * 0.02, group_size=32, bits=4) for _ in range(n)]
        x = mx.random.normal((1, 1, cols)).astype(mx.float16)
        mx.eval(mats, x)
        nbytes = n * sum(a.nbytes for a in mats[0])
        mlx_s = timed(lambda: [mx.quantized_matmul(x, *m, transpose=True, group_size=32, bits=4) for m in mats], reps=10)
        print(f"affine 4-bit {rows}×{cols}, one token (×{n}): MLX quantized_matmul {mlx_s / n * 1e6:7.1f} µs ({nbytes / mlx_s / 1e9:5.0f} GB/s)")
        sweep(f"affine 4-bit {rows}×{cols}", AFFINE_TILES, cuda_affine, ("WARPS", "ROWS_PER_BLOCK", "UNROLL"),
              lambda: [cuda_affine.matvec(x, *m, 4) for m in mats], n, nbytes, totals)
        mats.clear()  # the matrices freed before the next shape
    best = min(totals, key=totals.get)
    print(f"best affine tile over the 7B shapes: {best}; best Q6_K tile: {q6_best}")
    if len(sys.argv) > 1:  # a file of shell exports for the end-to-end run
        with open(sys.argv[1], "w") as f:
            f.write(f"export MLX_LLAMA_AFFINE_TILE={','.join(map(str, best))} MLX_LLAMA_Q6_K_TILE={','.join(map(str, q6_best))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
