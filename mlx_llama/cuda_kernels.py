"""CUDA kernels for the Q2_K/Q6_K blocks (`quants.Blocks`) on MLX's CUDA backend.

MLX has no 16-weight-group quantized matmul, so these layers keep the file's blocks. With MLX
ops alone, each use writes the whole weight out in the compute dtype and reads it back; on a
GPU two `mx.fast.cuda_kernel`s do better:

* `block_matvec` — x @ W.T for a few rows of x (decoding): each warp walks one weight row's
  blocks (or every SPLIT-th of them, where the rows are too few to fill the GPU) and reads only
  the blocks; sums in float32, reduced with shuffles; a split row's partial sums added after.
  Q6_K: a warp per 4 rows (one read of the activations serves them), 8 threads per 256-weight block, a thread's 32 weights from
  two 16-byte loads of low bits and two of high bits (the high bits are shared by 4 threads: L1
  serves the repeats), its activations 16 bytes at a time (`cuda_affine.load32`), the row's sum
  in shared memory, written in x's dtype. Q2_K (rare): a lane per weight, split rows.
* `dequantize` — the weights in the compute dtype (prefill: then one cuBLAS matmul), one thread
  per weight, each value computed as gguf computes it (float32, round-to-nearest intrinsics so
  the compiler fuses no multiply-add): identical to `quants.dequantize_blocks`.

Both take the fields as `quants.split_blocks` makes them: Q6_K qs (rows, nb, 192: 128 bytes of
low 4 bits, then 64 of high 2 bits), scales (rows, nb, 16) int8, d (rows, nb) float16; Q2_K
scales (rows, nb, 16) uint8, qs (rows, nb, 64), d and dmin (rows, nb) float16.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import cuda_affine
from .cuda_affine import HEADER
from .quants import Q2_K, Q6_K

MATVEC_MAX_ROWS = 8  # rows of x up to which `block_matvec` beats dequantize + matmul

# -- the value of weight i (0..255) of block blk, as float32: gguf's arithmetic --------------------
_VALUE = {
    Q6_K: """
    const uint8_t* bq = qs + blk * 192;
    const int h = i >> 7, j = i & 127, part = j >> 5, l = j & 31;
    const uint8_t low = bq[64 * h + l + 32 * (part & 1)];
    const int q = (((part >> 1) ? (low >> 4) : (low & 15)) | (((bq[128 + 32 * h + l] >> (2 * part)) & 3) << 4)) - 32;
    const float dl = __fmul_rn(static_cast<float>(d[blk]), static_cast<float>(scales[blk * 16 + (i >> 4)]));
    const float w = __fmul_rn(dl, static_cast<float>(q));
""",
    Q2_K: """
    const int h = i >> 7, j = i & 127, part = j >> 5, l = j & 31;
    const int q = (qs[blk * 64 + 32 * h + l] >> (2 * part)) & 3;
    const uint8_t sc = scales[blk * 16 + (i >> 4)];
    const float dl = __fmul_rn(static_cast<float>(d[blk]), static_cast<float>(sc & 15));
    const float ml = __fmul_rn(static_cast<float>(dmin[blk]), static_cast<float>(sc >> 4));
    const float w = __fsub_rn(__fmul_rn(dl, static_cast<float>(q)), ml);
""",
}
_FIELDS = {Q6_K: ["qs", "scales", "d"], Q2_K: ["scales", "qs", "d", "dmin"]}

_DEQUANTIZE = """
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= N) return;
    const int64_t blk = idx >> 8;
    const int i = int(idx & 255);
{value}
    out[idx] = static_cast<OutT>(w);
"""

_MATVEC = """
    // warp w sums blocks part, part + SPLIT, … of row w / SPLIT into out[part] (summed afterwards)
    const int warp = int((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    const int row = warp / SPLIT, part = warp % SPLIT;
    if (row >= ROWS) return;
    float acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    for (int b = part; b < NB; b += SPLIT) {{
        const int64_t blk = int64_t(row) * NB + b;
        for (int k = 0; k < 8; ++k) {{
            const int i = 32 * k + lane;  // weight i of the block: consecutive lanes, consecutive bytes
{value}
            for (int t = 0; t < NT; ++t) acc[t] += w * static_cast<float>(x[int64_t(t) * NB * 256 + b * 256 + i]);
        }}
    }}
    for (int t = 0; t < NT; ++t) {{
        float v = acc[t];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffff, v, off);
        if (lane == 0) out[(int64_t(part) * NT + t) * ROWS + row] = v;
    }}
"""
_Q6_K_MATVEC = """
    // a block of WARPS warps takes R rows (as the affine matvec); threads 8s..8s+7 take block
    // b0 + s of each step (s < 4 · WARPS) of each row, thread k of those 8 the block's weights
    // 32k..32k+31: half h = k / 4, part p = k % 4 of it, l = 0..31; one read of the activations
    // serves the R rows; sums across the warp with shuffles and across the warps in shared
    // memory, written once in x's dtype
    constexpr int PER_STEP = 4 * WARPS;  // blocks a row's threads take at once
    constexpr int THREADS = 32 * WARPS;
    const int row0 = blockIdx.x * R;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    const int sub = tid >> 3, k = tid & 7, h = k >> 2, p = k & 3;
    const int nib = 4 * (p >> 1), sh = 2 * p;
    float acc[NT][R];
    for (int t = 0; t < NT; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = 0.0f;
    for (int b = sub; b < NB; b += PER_STEP) {{
        // low 4 bits: bytes 64h + 32(p & 1) + l, nibble p / 2; high 2 bits: bytes 128 + 32h + l, bits 2p
        uint32_t lo[R][8], hi[R][8];
        float dl0[R], dl1[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {{
            const int64_t blk = int64_t(min(row0 + r, ROWS - 1)) * NB + b;
            const uint8_t* bq = qs + blk * 192;
            const uint4 l0 = __ldg(reinterpret_cast<const uint4*>(bq + 64 * h + 32 * (p & 1)));
            const uint4 l1 = __ldg(reinterpret_cast<const uint4*>(bq + 64 * h + 32 * (p & 1) + 16));
            const uint4 h0 = __ldg(reinterpret_cast<const uint4*>(bq + 128 + 32 * h));
            const uint4 h1 = __ldg(reinterpret_cast<const uint4*>(bq + 128 + 32 * h + 16));
            lo[r][0] = l0.x; lo[r][1] = l0.y; lo[r][2] = l0.z; lo[r][3] = l0.w;
            lo[r][4] = l1.x; lo[r][5] = l1.y; lo[r][6] = l1.z; lo[r][7] = l1.w;
            hi[r][0] = h0.x; hi[r][1] = h0.y; hi[r][2] = h0.z; hi[r][3] = h0.w;
            hi[r][4] = h1.x; hi[r][5] = h1.y; hi[r][6] = h1.z; hi[r][7] = h1.w;
            // weights 16j.. of the block have scale 16-group 8h + 2p + j (j = 0, 1), as gguf: d · sc
            const float dd = static_cast<float>(d[blk]);
            dl0[r] = __fmul_rn(dd, static_cast<float>(scales[blk * 16 + 8 * h + 2 * p]));
            dl1[r] = __fmul_rn(dd, static_cast<float>(scales[blk * 16 + 8 * h + 2 * p + 1]));
        }}
        for (int t = 0; t < NT; ++t) {{
            float xv[32];
            load_input<ACT>(x, t, int64_t(NB) * 256, int64_t(b) * 256 + 128 * h + 32 * p, xv);
#pragma unroll
            for (int r = 0; r < R; ++r) {{
                float dot = 0.0f;
#pragma unroll
                for (int l = 0; l < 32; ++l) {{
                    const uint32_t low = (lo[r][l >> 2] >> (8 * (l & 3) + nib)) & 15u;
                    const uint32_t high = (hi[r][l >> 2] >> (8 * (l & 3) + sh)) & 3u;
                    const float q = __uint_as_float(0x4B000000u | (low | (high << 4))) - 8388640.0f;  // q − 32
                    dot = fmaf(__fmul_rn(l < 16 ? dl0[r] : dl1[r], q), xv[l], dot);
                }}
                acc[t][r] += dot;
            }}
        }}
    }}
    __shared__ float partial[NT][R][WARPS];
    for (int t = 0; t < NT; ++t)
        for (int r = 0; r < R; ++r) {{
            float v = acc[t][r];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) partial[t][r][wid] = v;
        }}
    __syncthreads();
    for (int i = tid; i < NT * R; i += THREADS) {{
        const int t = i / R, r = i % R;
        float v = 0.0f;
        for (int w = 0; w < WARPS; ++w) v += partial[t][r][w];
        if (row0 + r < ROWS) out[int64_t(t) * ROWS + row0 + r] = static_cast<OutT>(v);
    }}
"""
# Q2_K: enough warps to fill a large GPU (~16K): rows with few warps are split along their blocks.
TARGET_WARPS = 16384


# warps per block, rows per block of the Q6_K matvec (MLX_LLAMA_Q6_K_TILE="W,R" overrides them)
Q6_K_WARPS, Q6_K_ROWS = cuda_affine.tile_from_env("MLX_LLAMA_Q6_K_TILE", (1, 4))

def available() -> bool:
    """True where these kernels can run: MLX's CUDA backend, default device the GPU (see
    `cuda_affine.available`)."""
    return cuda_affine.available()


@functools.cache  # the body formatted once per kernel
def _kernel(kind: str, ggml_type: int):
    fields = _FIELDS[ggml_type]
    if kind == "matvec" and ggml_type == Q6_K:
        body = _Q6_K_MATVEC.format()
    else:
        body = (_DEQUANTIZE if kind == "dequantize" else _MATVEC).format(value=_VALUE[ggml_type])
    inputs = fields if kind == "dequantize" else ["x", *fields]
    return cuda_affine.kernel(f"mlx_llama_{kind}_{ggml_type}", inputs, ["out"], body, HEADER)


@functools.cache
def _q6_k_add_norm():
    return cuda_affine.kernel("mlx_llama_matvec_add_norm_14", ["x", *_FIELDS[Q6_K], "resid", "nweight", "counter"],
                              ["out", "hsum", "normed"], _Q6_K_MATVEC.format() + cuda_affine._NORM_TAIL, HEADER)


def block_matvec_add_norm(x: mx.array, fields: dict, resid: mx.array, weight: mx.array, eps: float,
                          counter: mx.array) -> tuple[mx.array, mx.array]:
    """(h, y): h = resid + x @ W.T for Q6_K blocks W, y = rms_norm(h, weight, eps), in one kernel
    (`cuda_affine.matvec_add_norm`'s tail on `block_matvec`'s product; its counter likewise)."""
    rows = fields["d"].shape[0]
    _, h, y = _q6_k_add_norm()(
        inputs=[x, *(fields[k] for k in _FIELDS[Q6_K]), resid, weight, counter],
        **_q6_k_launch(x, fields, 0, extra=(("EPS_BITS", cuda_affine.float_bits(eps)),)),
        output_shapes=[(*x.shape[:-1], rows)] * 3, output_dtypes=[x.dtype] * 3,
    )
    return h, y


def _q6_k_launch(x: mx.array, fields: dict, act: int, extra: tuple = ()) -> dict:
    """The template, grid and block of `_Q6_K_MATVEC` for x's rows (`extra`: more template arguments)."""
    rows, nb = fields["d"].shape
    nt = x.size // x.shape[-1]
    r = max(1, Q6_K_ROWS // nt)  # a batch's rows share the registers
    return dict(template=[("NT", nt), ("NB", nb), ("ROWS", rows), ("WARPS", Q6_K_WARPS), ("R", r), ("ACT", act), *extra,
                          ("OutT", x.dtype)],
                grid=(-(-rows // r) * 32 * Q6_K_WARPS, 1, 1), threadgroup=(32 * Q6_K_WARPS, 1, 1))


def dequantize(ggml_type: int, fields: dict, dtype: mx.Dtype) -> mx.array:
    """(rows, nb, …) blocks → (rows, nb · 256) weights in `dtype`."""
    rows, nb = fields["d"].shape
    n = rows * nb * 256
    return _kernel("dequantize", ggml_type)(
        inputs=[fields[k] for k in _FIELDS[ggml_type]],
        template=[("N", n), ("OutT", dtype)],
        grid=(n, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(rows, nb * 256)], output_dtypes=[dtype],
    )[0]


def block_matvec(x: mx.array, ggml_type: int, fields: dict, act: int = 0) -> mx.array:
    """x (..., K) with at most `MATVEC_MAX_ROWS` rows → x @ W.T (..., rows), float32 sums (in x's
    dtype for Q6_K, float32 for Q2_K). act (Q6_K only): x is [gate; up] (..., 2K), the product
    is of act(gate) · up (`cuda_affine.matvec`)."""
    rows, nb = fields["d"].shape
    lead = x.shape[:-1]
    nt = 1
    for n in lead:
        nt *= n
    inputs = [x, *(fields[k] for k in _FIELDS[ggml_type])]  # read as nt rows: no reshape (a primitive)
    if ggml_type == Q6_K:
        return _kernel("matvec", ggml_type)(inputs=inputs, **_q6_k_launch(x, fields, act), output_shapes=[(*lead, rows)],
                                            output_dtypes=[x.dtype])[0]
    if act:
        raise ValueError("the gated activation is read inside the Q6_K matvec only")
    split = max(1, min(nb, -(-TARGET_WARPS // rows)))
    out = _kernel("matvec", ggml_type)(
        inputs=inputs, template=[("NT", nt), ("NB", nb), ("ROWS", rows), ("SPLIT", split)],
        grid=(rows * split * 32, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(split, nt, rows)], output_dtypes=[mx.float32],
    )[0]
    return out.sum(axis=0).astype(x.dtype).reshape(*lead, rows)  # a fixed order: deterministic
