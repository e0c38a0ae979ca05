"""On MLX's CUDA backend: the tensor-core 4-bit matvec (`cuda_mma`) against the scalar one
(`cuda_affine`) on a Llama-2-7B layer's shapes, Q4_0's form (symmetric; the down projection
reading [gate; up]), as µs per product and GB/s of weights read; several tilings of the
tensor-core kernel. Exactness: `tests/test_cuda_kernels.py -k mma`.

    python scripts/check_mma.py [ENV_FILE]

With ENV_FILE: writes `export MLX_LLAMA_AFFINE_MMA=1 MLX_LLAMA_MMA_TILE=W,U` there when the
tensor-core kernel's fastest tiling beats the scalar kernel over a token's products
(`MLX_LLAMA_AFFINE_MMA=0` otherwise).
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from check_cuda_kernels import timed  # noqa: E402
from mlx_llama import cuda_affine, cuda_mma  # noqa: E402

# (rows, columns, gated input, products per token): q+k+v fused, o, gate+up fused, down, output
SHAPES = [(12288, 4096, 0, 32), (4096, 4096, 0, 32), (22016, 4096, 0, 32), (4096, 11008, 1, 32), (32000, 4096, 0, 1)]
TILES = [(4, 2), (8, 1), (8, 2)]


def symmetric_weights(rng, rows: int, k: int, n: int):
    """n distinct Q4_0-form matrices (biases −8 · scale)."""
    mats = []
    for _ in range(n):
        scales = mx.array(rng.uniform(0.001, 0.01, (rows, k // 32)), mx.float16)
        mats.append((mx.array(rng.integers(0, 2 ** 32, (rows, k // 8), dtype=np.uint32)), scales, scales * -8))
    return mats


def main() -> int:
    assert cuda_affine.available(), "needs MLX's CUDA backend"
    rng = np.random.default_rng(0)
    scalar_total, mma_totals = 0.0, dict.fromkeys(TILES, 0.0)
    for rows, k, act, per_token in SHAPES:
        n = max(2, int(400e6 // (rows * k * 5 / 8)))  # several matrices: beyond the 60 MB L2
        mats = symmetric_weights(rng, rows, k, n)
        x = (mx.random.normal((1, 1, (2 if act else 1) * k)) * 0.5).astype(mx.float16)
        mx.eval(mats, x)
        nbytes = n * (mats[0][0].nbytes + mats[0][1].nbytes)  # what the symmetric kernels read
        s = timed(lambda: [cuda_affine.matvec(x, *m, 4, symmetric=True, act=act) for m in mats], reps=20) / n
        scalar_total += s * per_token
        line = f"{rows}×{k}{' gated' if act else ''}: scalar {s * 1e6:6.1f} µs ({nbytes / n / s / 1e9:5.0f} GB/s)"
        for tile in TILES:
            cuda_mma.WARPS, cuda_mma.UNROLL = tile
            m_s = timed(lambda: [cuda_mma.matvec(x, *m, symmetric=True, act=act) for m in mats], reps=20) / n
            mma_totals[tile] += m_s * per_token
            line += f"; mma {tile} {m_s * 1e6:6.1f} µs ({nbytes / n / m_s / 1e9:5.0f} GB/s)"
        print(line, flush=True)
        mats.clear()  # the matrices freed before the next shape
    best = min(mma_totals, key=mma_totals.get)
    print(f"a token's products: scalar {scalar_total * 1e3:.3f} ms; tensor cores "
          + ", ".join(f"{t} {v * 1e3:.3f} ms" for t, v in mma_totals.items()) + f"; best {best}")
    if len(sys.argv) > 1:
        faster = mma_totals[best] < scalar_total
        with open(sys.argv[1], "w") as f:
            f.write(f"export MLX_LLAMA_AFFINE_MMA={int(faster)} MLX_LLAMA_MMA_TILE={best[0]},{best[1]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
