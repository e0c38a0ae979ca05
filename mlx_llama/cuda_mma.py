"""A 4-bit affine matrix-vector product on tensor cores (one decoded token, float16 activations).

`cuda_affine`'s kernel spends ~5 instructions per weight (the nibble made a float, a
subtraction, a multiply-add, the activations converted): on an H200 its matvecs run well below
the memory's bandwidth. Here the multiply-adds go to the tensor cores (`mma.sync` m16n8k16,
float16 inputs, float32 sums): each weight becomes an exact float16 integer with two bit
operations and one half2 subtraction per two weights, and one instruction multiplies 16 rows by
16 activations. The sums stay what they were: q (or q − 2^(bits−1)) and x are exact in float16,
their products exact in float32, summed in float32 per group of 32, then scaled (and the bias
times Σ x added) per group in float32 — the scalar kernel's arithmetic up to summation order.

Layout: a warp takes 16 rows (a block of WARPS warps the same 16 rows, each warp every WARPS-th
chunk of 128 columns, their sums added in shared memory). Lane (g, t) (g = lane / 4, t = lane % 4)
loads word t of each of a chunk's 4 groups for rows g and g + 8 (8 nibbles: columns 8t..8t+7 of
the group) and the 8 activations at the same columns; the tensor-core fragment's column slots
(2t, 2t+1, 2t+8, 2t+9 of each k-step) are mapped onto those columns alike for the weights and the
activations (column order within a k-step does not change a dot product):

    k-step 0: slots (2t, 2t+1) ← columns (8t, 8t+4), slots (2t+8, 2t+9) ← (8t+1, 8t+5)
    k-step 1: slots (2t, 2t+1) ← columns (8t+2, 8t+6), slots (2t+8, 2t+9) ← (8t+3, 8t+7)

so that nibbles m and m + 4 of a word, 16 bits apart, become one half2 with one mask. The
activations are the same for every output column of the fragment: each of its 8 columns holds
the product, and a lane reads its rows' sums from c0 (row g) and c2 (row g + 8).
With ACT (the down projection reading [gate; up]) the block first writes act(gate) · up, rounded
to float16, into shared memory.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import cuda_affine

# warps per block (splitting the columns), chunks of 128 columns each warp loads ahead
WARPS, UNROLL = cuda_affine.tile_from_env("MLX_LLAMA_MMA_TILE", (8, 2))
MAX_SHARED_K = 16384  # with ACT: act(gate) · up staged in shared memory (2 bytes per column)

HEADER = cuda_affine.HEADER + r"""
// two nibbles 16 bits apart (bits 0-3 and 16-19 of w) as a half2 of exact integers, less ZERO:
// 0x6400 | n is the float16 1024 + n
template <int ZERO>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w) {
  uint32_t v = (w & 0x000F000Fu) | 0x64006400u;
  const __half2 zero = __halves2half2(__ushort_as_half(0x6400 + ZERO), __ushort_as_half(0x6400 + ZERO));
  __half2 h = __hsub2(*reinterpret_cast<__half2*>(&v), zero);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Σ q · x over one group for rows g (c[0]) and g + 8 (c[2]): wa, wb the rows' word t, xw the 8
// activations at columns 8t..8t+7 (4 half2)
template <int ZERO>
__device__ __forceinline__ void group_mma(float* c, uint32_t wa, uint32_t wb, const uint32_t* xw) {
  const uint32_t b00 = __byte_perm(xw[0], xw[2], 0x5410), b01 = __byte_perm(xw[0], xw[2], 0x7632);
  const uint32_t b10 = __byte_perm(xw[1], xw[3], 0x5410), b11 = __byte_perm(xw[1], xw[3], 0x7632);
  c[0] = c[1] = c[2] = c[3] = 0.0f;
  mma16816(c, nibble_pair<ZERO>(wa), nibble_pair<ZERO>(wb), nibble_pair<ZERO>(wa >> 4), nibble_pair<ZERO>(wb >> 4),
           b00, b01);
  mma16816(c, nibble_pair<ZERO>(wa >> 8), nibble_pair<ZERO>(wb >> 8), nibble_pair<ZERO>(wa >> 12),
           nibble_pair<ZERO>(wb >> 12), b10, b11);
}
// float16 i (0..3) of 4 packed in a uint2, as float
__device__ __forceinline__ float half_at(uint2 v, int i) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>((i < 2 ? v.x : v.y) >> (16 * (i & 1)))));
}
__device__ __forceinline__ float sum8(const uint32_t* xw) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&xw[i]));
    s += f.x + f.y;
  }
  return s;
}
"""

_SOURCE = r"""
    constexpr int CHUNKS = K / 128, G = K / 32, ZERO = SYM ? 8 : 0;
    const int row0 = blockIdx.x * 16;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, g = lane >> 2, t = lane & 3;
    const int64_t ra = min(row0 + g, ROWS - 1), rb = min(row0 + g + 8, ROWS - 1);
    const uint32_t* wa = w + ra * (K / 8);
    const uint32_t* wb = w + rb * (K / 8);
    const __half* xin;
    if constexpr (ACT > 0) {  // act(gate) · up, rounded to float16, for the whole block
        __shared__ __align__(16) __half staged[ACT > 0 ? K : 8];
        for (int c = tid; c < K / 2; c += 32 * WARPS) {
            const __half2 gate = reinterpret_cast<const __half2*>(x)[c], up = reinterpret_cast<const __half2*>(x + K)[c];
            const float2 gf = __half22float2(gate), uf = __half22float2(up);
            reinterpret_cast<__half2*>(staged)[c] = __floats2half2_rn(activate<ACT>(gf.x) * uf.x, activate<ACT>(gf.y) * uf.y);
        }
        __syncthreads();
        xin = staged;
    } else {
        xin = x;
    }
    float acc_a = 0.0f, acc_b = 0.0f;
    for (int c0 = wid; c0 < CHUNKS; c0 += WARPS * UNROLL) {
        uint32_t qa[UNROLL][4], qb[UNROLL][4], xw[UNROLL][4][4];
        uint2 sa[UNROLL], sb[UNROLL], ba[UNROLL], bb[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + WARPS * u;
            if (c < CHUNKS) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    qa[u][i] = __ldg(wa + (4 * c + i) * 4 + t);
                    qb[u][i] = __ldg(wb + (4 * c + i) * 4 + t);
                    const uint4 v = *reinterpret_cast<const uint4*>(xin + 128 * c + 32 * i + 8 * t);
                    xw[u][i][0] = v.x; xw[u][i][1] = v.y; xw[u][i][2] = v.z; xw[u][i][3] = v.w;
                }
                sa[u] = __ldg(reinterpret_cast<const uint2*>(scales + ra * G + 4 * c));
                sb[u] = __ldg(reinterpret_cast<const uint2*>(scales + rb * G + 4 * c));
                if constexpr (!SYM) {
                    ba[u] = __ldg(reinterpret_cast<const uint2*>(biases + ra * G + 4 * c));
                    bb[u] = __ldg(reinterpret_cast<const uint2*>(biases + rb * G + 4 * c));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (c0 + WARPS * u >= CHUNKS) break;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float c[4];
                group_mma<ZERO>(c, qa[u][i], qb[u][i], xw[u][i]);
                if constexpr (SYM) {
                    acc_a = fmaf(half_at(sa[u], i), c[0], acc_a);
                    acc_b = fmaf(half_at(sb[u], i), c[2], acc_b);
                } else {  // the bias times the group's Σ x (a quad holds the group's 32 activations)
                    float xs = sum8(xw[u][i]);
                    xs += __shfl_xor_sync(0xffffffffu, xs, 1);
                    xs += __shfl_xor_sync(0xffffffffu, xs, 2);
                    acc_a += fmaf(half_at(sa[u], i), c[0], half_at(ba[u], i) * xs);
                    acc_b += fmaf(half_at(sb[u], i), c[2], half_at(bb[u], i) * xs);
                }
            }
        }
    }
    __shared__ float partial[WARPS][16];
    if (t == 0) {
        partial[wid][g] = acc_a;
        partial[wid][g + 8] = acc_b;
    }
    __syncthreads();
    if (tid < 16 && row0 + tid < ROWS) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) v += partial[k][tid];
        out[row0 + tid] = static_cast<__half>(v);
    }
"""

def enabled() -> bool:
    """On where measured faster (MLX_LLAMA_AFFINE_MMA=1; off until then)."""
    return os.environ.get("MLX_LLAMA_AFFINE_MMA", "0") == "1"


def serves(x: mx.array, bits: int, k: int, act: int) -> bool:
    """One float16 row, 4-bit weights, whole chunks of 128 columns (with ACT, few enough to stage)."""
    return (enabled() and bits == 4 and x.dtype == mx.float16 and x.size == x.shape[-1] and k % 128 == 0
            and (not act or k <= MAX_SHARED_K))


def matvec(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, symmetric: bool = False,
           act: int = 0) -> mx.array:
    """x (..., K) one row, float16 → x @ W.T (..., rows) in float16; as `cuda_affine.matvec`."""
    rows = w.shape[0]
    k = x.shape[-1] // (2 if act else 1)
    return cuda_affine.kernel("mlx_llama_affine_mma", ["x", "w", "scales", "biases"], ["out"], _SOURCE, HEADER)(
        inputs=[x.reshape(1, x.shape[-1]), w, scales, biases],
        template=[("K", k), ("ROWS", rows), ("WARPS", WARPS), ("UNROLL", UNROLL), ("SYM", int(symmetric)), ("ACT", act)],
        grid=(-(-rows // 16) * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(1, rows)], output_dtypes=[mx.float16],
    )[0].reshape(*x.shape[:-1], rows)
