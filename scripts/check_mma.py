"""On MLX's CUDA backend: the tensor-core 4-bit matvec (`cuda_mma`) against the scalar one
(`cuda_affine`) on a Llama-2-7B layer's shapes, Q4_0's form (symmetric; the down projection
reading [gate; up]), as µs per product and GB/s of weights read, under several tilings of each;
the products of a shape traced into one compiled graph, as in a decode step. Exactness:
`tests/test_cuda_kernels.py -k mma`.

    python scripts/check_mma.py [ENV_FILE]

With ENV_FILE: writes there the scalar kernel's fastest tiling (MLX_LLAMA_AFFINE_TILE) and the
tensor-core kernel's (MLX_LLAMA_MMA_TILE), and MLX_LLAMA_AFFINE_MMA=1 when that beats the scalar
kernel over a token's products (0 otherwise).
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
# (the gated-input form is the opt-in "glu" piece: left out here)
SHAPES = [(12288, 4096, 0, 32), (4096, 4096, 0, 32), (22016, 4096, 0, 32), (4096, 11008, 0, 32), (32000, 4096, 0, 1)]
TILES = [(4, 2), (8, 1), (8, 2)]


def symmetric_weights(rng, rows: int, k: int, n: int):
    """n distinct Q4_0-form matrices (biases −8 · scale)."""
    mats = []
    for _ in range(n):
        scales = mx.array(rng.uniform(0.001, 0.01, (rows, k // 32)), mx.float16)
        mats.append((mx.array(rng.integers(0, 2 ** 32, (rows, k // 8), dtype=np.uint32)), scales, scales * -8))
    return mats


SCALAR_TILES = [(1, 2, 2), (1, 4, 2), (2, 4, 2), (1, 4, 1)]  # cuda_affine: warps, rows per block, groups ahead


def compiled_time(products, x) -> float:
    """Seconds per evaluation of all `products(x)` traced into one compiled graph (as in a decode
    step: MLX then spends ~3 µs of host time per kernel, not ~20, so the GPU's time shows)."""
    fn = mx.compile(lambda v: products(v))
    return timed(lambda: fn(x), reps=20)


def sweep_shape(rows: int, k: int, act: int, mats, x, totals: dict) -> str:
    """Each kernel and tiling on one shape: adds seconds per product to `totals`, returns a line."""
    n = len(mats)
    nbytes = mats[0][0].nbytes + mats[0][1].nbytes  # what the symmetric kernels read
    line = f"{rows}×{k}{' gated' if act else ''}:"
    lean_before = cuda_affine.LEAN
    for lean, tile in [(False, SCALAR_TILES[0])] + [(True, t) for t in SCALAR_TILES]:
        cuda_affine.WARPS, cuda_affine.ROWS_PER_BLOCK, cuda_affine.UNROLL = tile
        cuda_affine.LEAN = lean
        s = compiled_time(lambda v: [cuda_affine.matvec(v, *m, 4, symmetric=True, act=act) for m in mats], x) / n
        kind = "scalar" if lean else "scalar, shift-mask-or"
        totals[kind, tile] = totals.get((kind, tile), 0.0) + s * dict(PER_TOKEN)[rows, k]
        line += f" {kind} {tile} {s * 1e6:5.1f} µs ({nbytes / s / 1e9:4.0f} GB/s);"
    cuda_affine.LEAN = lean_before
    for tile in TILES:
        cuda_mma.WARPS, cuda_mma.UNROLL = tile
        s = compiled_time(lambda v: [cuda_mma.matvec(v, *m, symmetric=True, act=act) for m in mats], x) / n
        totals["mma", tile] = totals.get(("mma", tile), 0.0) + s * dict(PER_TOKEN)[rows, k]
        line += f" mma {tile} {s * 1e6:5.1f} µs ({nbytes / s / 1e9:4.0f} GB/s);"
    return line


PER_TOKEN = [((rows, k), count) for rows, k, _, count in SHAPES]


def main() -> int:
    assert cuda_affine.available(), "needs MLX's CUDA backend"
    rng = np.random.default_rng(0)
    totals: dict = {}
    for rows, k, act, _ in SHAPES:
        n = max(2, int(400e6 // (rows * k * 5 / 8)))  # several matrices: beyond the 60 MB L2
        mats = symmetric_weights(rng, rows, k, n)
        x = (mx.random.normal((1, 1, (2 if act else 1) * k)) * 0.5).astype(mx.float16)
        mx.eval(mats, x)
        print(sweep_shape(rows, k, act, mats, x, totals), flush=True)
        mats.clear()  # the matrices freed before the next shape
    print("a token's products: " + "; ".join(f"{kind} {tile} {v * 1e3:.3f} ms" for (kind, tile), v in totals.items()))
    scalar = min((t for kind, t in totals if kind == "scalar"), key=lambda t: totals["scalar", t])
    mma = min((t for kind, t in totals if kind == "mma"), key=lambda t: totals["mma", t])
    print(f"best: scalar {scalar}, tensor cores {mma}")
    if len(sys.argv) > 1:
        faster = totals["mma", mma] < totals["scalar", scalar]
        with open(sys.argv[1], "w") as f:
            f.write(f"export MLX_LLAMA_AFFINE_MMA={int(faster)} MLX_LLAMA_MMA_TILE={mma[0]},{mma[1]} "
                    f"MLX_LLAMA_AFFINE_TILE={','.join(map(str, scalar))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
