"""On MLX's CUDA backend: the Q2_K/Q6_K kernels (`mlx_llama.cuda_kernels`) against the MLX-ops
dequantizer (exact) and a dense matmul, and their speed on a 7B-sized tensor.

    python scripts/check_cuda_kernels.py
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

from mlx_llama import cuda_kernels, quants

SIZES = {quants.Q6_K: 210, quants.Q2_K: 84}
F16_AT = {quants.Q6_K: (208,), quants.Q2_K: (80, 82)}


def random_fields(ggml_type: int, rows: int, nb: int, seed: int = 0, scale: float = 1e-3):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, nb, SIZES[ggml_type]), dtype=np.uint8)
    for at in F16_AT[ggml_type]:
        b[..., at : at + 2] = (rng.standard_normal((rows, nb)) * scale).astype(np.float16)[..., None].view(np.uint8)
    return quants._split_blocks(ggml_type, b).fields


def timed(fn, reps: int = 50) -> float:
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps


def main() -> int:
    assert cuda_kernels.available(), "needs MLX's CUDA backend"
    ok = True
    for t, name in ((quants.Q6_K, "Q6_K"), (quants.Q2_K, "Q2_K")):
        fields = random_fields(t, 64, 6)
        with mx.stream(mx.cpu):
            ref = np.array(quants.dequantize_blocks(t, fields))
        for dtype in (mx.float32, mx.float16):
            ours = np.array(cuda_kernels.dequantize(t, fields, dtype).astype(mx.float32))
            exact = np.array_equal(ours, ref.astype(np.float16).astype(np.float32) if dtype == mx.float16 else ref)
            ok &= exact
            print(f"{name} dequantize {dtype}: identical to the MLX-ops values: {exact}")
        for nt in (1, 3, 8):
            x = mx.random.normal((nt, 6 * 256), key=mx.random.key(nt))
            got = np.array(cuda_kernels.block_matvec(x, t, fields))
            want = np.array(x) @ ref.T.astype(np.float64)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            ok &= err < 1e-5
            print(f"{name} matvec x({nt}, {6 * 256}) float32: max relative error {err:.2e}")
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
    rows, nb = 4096, 11008 // 256
    fields = random_fields(quants.Q6_K, rows, nb, scale=1e-5)
    dense = cuda_kernels.dequantize(quants.Q6_K, fields, mx.float16)
    x = mx.random.normal((1, 1, nb * 256)).astype(mx.float16)
    mx.eval(dense, x)
    blocks_bytes = sum(v.nbytes for v in fields.values())
    rows_out = [
        ("dense float16 matmul", lambda: x @ dense.T, dense.nbytes),
        ("blocks: MLX ops dequantize + matmul", lambda: x @ quants.dequantize_blocks(quants.Q6_K, fields, mx.float16).T, blocks_bytes),
        ("blocks: CUDA dequantize + matmul", lambda: x @ cuda_kernels.dequantize(quants.Q6_K, fields, mx.float16).T, blocks_bytes),
        ("blocks: CUDA matvec", lambda: cuda_kernels.block_matvec(x, quants.Q6_K, fields), blocks_bytes),
    ]
    for label, fn, nbytes in rows_out:
        s = timed(fn)
        print(f"Q6_K 4096×11008, one token, {label:38}: {s * 1e6:8.1f} µs  ({nbytes / s / 1e9:6.0f} GB/s of weights read)")
    print("all exact" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
