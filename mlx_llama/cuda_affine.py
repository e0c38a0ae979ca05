"""A CUDA matrix-vector product for MLX's affine quantized weights (decoding on NVIDIA GPUs).

Decoding multiplies each weight matrix by one activation row (or a few: a batch), so its time
is the time to read the weights. MLX's own quantized matvec reads them at ~0.6 TB/s on an H200
(14% of the card); this kernel is written for the bandwidth:

* a block of WARPS warps takes R rows of W (`WARPS`, `ROWS_PER_BLOCK`: `tile_from_env`); thread i takes groups i, i + 32·WARPS, …
  of each row: a group is 32 weights (MLX's group size here), `BITS` consecutive 32-bit words of
  the packed row, so a 4-bit group is one 16-byte load and a warp reads 512 contiguous bytes per
  step; UNROLL groups of each row are loaded before any is used, to keep several loads in flight;
* its float16 scale and bias (one 2-byte load each, contiguous across the warp);
* the activations' 32 values from global memory through the read-only cache, 16 bytes at a time,
  once for the block's R rows (read per row, they cost more load instructions than the weights);
* per group Σ w·x = scale · Σ q·x + bias · Σ x in float32 (MLX's w = scale · q + bias, summed in
  another order: rounding-level differences) — or, where every bias is −2^(bits−1) · scale
  (Q4_0, Q5_0, Q8_0: `is_symmetric`), scale · Σ (q − 2^(bits−1)) · x, the biases not read; then
  across the warp with shuffles and across the block's warps in shared memory; written once in
  the activations' dtype.

Layout (MLX's affine format, `quants.Affine`): w (rows, K · BITS / 32) uint32, value i of a row at
bits [BITS · i, BITS · (i + 1)) of its little-endian bit stream; scales, biases (rows, K / 32).
"""

from __future__ import annotations

import os
import re
import struct

import mlx.core as mx

GROUP = 32
MATVEC_MAX_ROWS = 8  # activation rows up to which the matvec beats dequantizing for a matmul

def float_bits(x: float) -> int:
    """A float32's bits as an int (a kernel's template argument)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def tile_from_env(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's tiling: `default`, or the comma-separated integers in environment variable
    `name` (for measuring: scripts/check_cuda_kernels.py)."""
    spec = os.environ.get(name, "")
    return tuple(int(v) for v in spec.split(",")) if spec else default


PIECES = ("sym", "norm", "rope", "glu", "act", "inplace", "tail", "embed")  # the fused decode pieces, as `fused_kernels` names them
# the defaults measured on an H200 (BENCHMARKS.md); glu, tail and embed opt-in: tested there, not faster
FUSED_DEFAULT = "sym,norm,rope,act,inplace"


def fused_kernels(piece: str) -> bool:
    """Whether the fused CUDA decode piece `piece` is on: MLX_LLAMA_CUDA_FUSE lists them (default
    `FUSED_DEFAULT`; "none" for none): sym (symmetric layers read without biases), norm (the
    residual add with the RMS norm), rope (RoPE and the new key/value inside the decode attention),
    glu (the gated activation read inside the down projection's matvec), act (gate and up rows
    interleaved at load, the gated activation computed as their matvec writes), inplace (the
    decode attention writes the new key and value into the cache buffer itself: no scatter), tail
    (the residual add and norm after the attention's and the feed-forward's output projections
    done by those projections' matvecs: `matvec_add_norm`), embed (a decoded token's embedding row
    in one kernel: `cuda_embed`)."""
    return piece in os.environ.get("MLX_LLAMA_CUDA_FUSE", FUSED_DEFAULT).split(",")


# warps per block, rows of W per block, groups each thread loads before using them
WARPS, ROWS_PER_BLOCK, UNROLL = tile_from_env("MLX_LLAMA_AFFINE_TILE", (1, 2, 2))
# 4-bit groups summed by nibble position, three instructions a weight (`group_dot`); 0: the
# shift-mask-or form of the other widths (MLX_LLAMA_AFFINE_LEAN=0, for measuring)
LEAN = os.environ.get("MLX_LLAMA_AFFINE_LEAN", "1") != "0"

HEADER = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// one value through L2 (not the incoherent L1/read-only path): written by other blocks of this launch
__device__ __forceinline__ float load_l2(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float load_l2(const __half* p) {
  return __half2float(__ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load_l2(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p))));
}

// 32 consecutive activations as float, read 16 bytes at a time through the read-only cache.
__device__ __forceinline__ void load32(const float* p, float* v) {
  const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 f = __ldg(q + i);
    v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
  }
}
__device__ __forceinline__ void load32(const __half* p, float* v) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u = __ldg(q + i);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      v[8 * i + 2 * k] = f.x; v[8 * i + 2 * k + 1] = f.y;
    }
  }
}
__device__ __forceinline__ void load32(const __nv_bfloat16* p, float* v) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u = __ldg(q + i);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(h[k]);
      v[8 * i + 2 * k] = f.x; v[8 * i + 2 * k + 1] = f.y;
    }
  }
}

// act(gate) · up for 32 consecutive positions (gate at p, up at p + k), rounded to T as the
// activation's own kernel stores it: the gated activation read inside the down projection.
// ACT 1: SiLU, 2: GELU (tanh approximation).
template <int ACT>
__device__ __forceinline__ float activate(float g) {
  if constexpr (ACT == 1) return g / (1.0f + expf(-g));
  else return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}
template <int ACT, typename T>
__device__ __forceinline__ void load32_glu(const T* p, int64_t k, float* v) {
  float u[32];
  load32(p, v);
  load32(p + k, u);
#pragma unroll
  for (int j = 0; j < 32; ++j) v[j] = static_cast<float>(static_cast<T>(activate<ACT>(v[j]) * u[j]));
}
// the 32 activations a matvec reads at column c of row t: x itself (ACT 0), or act(gate) · up
// from x = [gate; up] (rows of 2k)
template <int ACT, typename T>
__device__ __forceinline__ void load_input(const T* x, int t, int64_t k, int64_t c, float* v) {
  if constexpr (ACT == 0) load32(x + int64_t(t) * k + c, v);
  else load32_glu<ACT>(x + int64_t(t) * 2 * k + c, k, v);
}

// The BITS words of one group: 16-byte loads where the group is a whole number of them.
template <int BITS>
__device__ __forceinline__ void load_group(const uint32_t* p, uint32_t* q) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
      q[4 * i] = u.x; q[4 * i + 1] = u.y; q[4 * i + 2] = u.z; q[4 * i + 3] = u.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) q[i] = __ldg(p + i);
  }
}

// Value j of a group as float, less ZERO: 2^23 + q has q in its mantissa, so the integer becomes
// a float with a bit-or and a subtraction (the int-to-float instruction runs at a quarter of the
// rate), the subtraction taking ZERO off too (exact: small integers).
template <int BITS, int ZERO = 0>
__device__ __forceinline__ float group_value(const uint32_t* q, int j) {
  const int bit = j * BITS, w = bit >> 5, s = bit & 31;
  uint32_t v = q[w] >> s;
  if (s + BITS > 32) v |= q[w + 1] << (32 - s);
  return __uint_as_float(0x4B000000u | (v & ((1u << BITS) - 1u))) - (8388608.0f + ZERO);
}

// (a & B) | C in one instruction (the compiler makes two of it when B and C are both constants)
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(B), "n"(C));
  return d;
}

// d += (q − ZERO) · 16^M · x for nibbles M and M + 4 of a word (lo: the word, hi: the word >> 16;
// x: the word's 8 activations)
template <int ZERO, int M>
__device__ __forceinline__ void nibble_dots(uint32_t lo, uint32_t hi, const float* x, float& d) {
  constexpr float base = 8388608.0f + float(ZERO << (4 * M));
  d = fmaf(__uint_as_float(and_or<0xFu << (4 * M), 0x4B000000u>(lo)) - base, x[M], d);
  d = fmaf(__uint_as_float(and_or<0xFu << (4 * M), 0x4B000000u>(hi)) - base, x[M + 4], d);
}

// Σ_j (q_j − ZERO) · x_j over one group. 4 bits: nibble m of a word (m < 4) or of the word shifted
// right 16 (nibbles 4..7) is masked in place, at bits 4m..4m+3, into the float 2^23 + q · 16^m
// (one instruction), and 2^23 + ZERO · 16^m subtracted: (q − ZERO) · 16^m, exact; those products
// are summed per m and the sums scaled by 16^−m (exact powers of two) — three instructions a
// weight where the shift-mask-or form takes five; the same products, summed in another order.
template <int BITS, int ZERO, int LEAN>
__device__ __forceinline__ float group_dot(const uint32_t* q, const float* xv) {
  float dot = 0.0f;
  if constexpr (BITS == 4 && LEAN) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t lo = q[w], hi = q[w] >> 16;
      nibble_dots<ZERO, 0>(lo, hi, xv + 8 * w, d[0]);
      nibble_dots<ZERO, 1>(lo, hi, xv + 8 * w, d[1]);
      nibble_dots<ZERO, 2>(lo, hi, xv + 8 * w, d[2]);
      nibble_dots<ZERO, 3>(lo, hi, xv + 8 * w, d[3]);
    }
    dot = fmaf(d[3], 1.0f / 4096.0f, fmaf(d[2], 1.0f / 256.0f, fmaf(d[1], 1.0f / 16.0f, d[0])));
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j) dot = fmaf(group_value<BITS, ZERO>(q, j), xv[j], dot);
  }
  return dot;
}
"""

_MATVEC = r"""
    // out (NT, ROWS) = x (NT, K) @ W.T; a block of WARPS warps takes R rows of W: thread i of the
    // block takes groups i, i + 32 WARPS, … of each (for K = 4096 and WARPS = 1: four), and each
    // group of activations it reads serves the R rows; w · x = s Σ q x + b Σ x per group; sums
    // across the warp with shuffles and across the block's warps in shared memory
    constexpr int THREADS = 32 * WARPS;
    const int row0 = blockIdx.x * R;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    constexpr int G = K / 32;
    float acc[NT][R];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[t][r] = 0.0f;
    for (int g0 = tid; g0 < G; g0 += THREADS * UNROLL) {
        uint32_t q[UNROLL][R][BITS];
        float s[UNROLL][R], b[UNROLL][R];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int g = g0 + THREADS * u;
            if (g < G) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int64_t row = min(row0 + r, ROWS - 1);
                    load_group<BITS>(w + (row * G + g) * BITS, q[u][r]);
                    s[u][r] = static_cast<float>(scales[row * G + g]);
                    // SYM: the bias is −2^(BITS−1) · scale (Q4_0, Q5_0, Q8_0): not read, the
                    // weights summed as s · Σ (q − 2^(BITS−1)) x
                    if constexpr (!SYM) b[u][r] = static_cast<float>(biases[row * G + g]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int g = g0 + THREADS * u;
            if (g >= G) break;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                float xv[32];
                load_input<ACT>(x, t, K, int64_t(g) * 32, xv);
                float xs = 0.0f;
                if constexpr (!SYM) {
#pragma unroll
                    for (int j = 0; j < 32; ++j) xs += xv[j];
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    constexpr int ZERO = SYM ? 1 << (BITS - 1) : 0;
                    const float dot = group_dot<BITS, ZERO, LEAN>(q[u][r], xv);
                    if constexpr (SYM) acc[t][r] += s[u][r] * dot;
                    else acc[t][r] += fmaf(s[u][r], dot, b[u][r] * xs);
                }
            }
        }
    }
    __shared__ float partial[NT][R][WARPS];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float v = acc[t][r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) partial[t][r][wid] = v;
        }
    __syncthreads();
    if constexpr (EPI == 0) {
        for (int i = tid; i < NT * R; i += THREADS) {
            const int t = i / R, r = i % R;
            float v = 0.0f;
#pragma unroll
            for (int k = 0; k < WARPS; ++k) v += partial[t][r][k];
            if (row0 + r < ROWS) out[int64_t(t) * ROWS + row0 + r] = static_cast<OutT>(v);
        }
    } else {  // rows 2j, 2j + 1 are gate_j, up_j (interleaved at load): out j = act(gate_j) · up_j
        for (int i = tid; i < NT * (R / 2); i += THREADS) {
            const int t = i / (R / 2), j = i % (R / 2), pair = row0 / 2 + j;
            float gs = 0.0f, us = 0.0f;
#pragma unroll
            for (int k = 0; k < WARPS; ++k) {
                gs += partial[t][2 * j][k];
                us += partial[t][2 * j + 1][k];
            }
            if (2 * pair + 1 < ROWS) {  // gate and up rounded as the unfused products store them
                const float gf = static_cast<float>(static_cast<OutT>(gs)), uf = static_cast<float>(static_cast<OutT>(us));
                out[int64_t(t) * (ROWS / 2) + pair] = static_cast<OutT>(activate<EPI>(gf) * uf);
            }
        }
    }
"""

# The residual add and RMS norm after a product, in its kernel (`matvec_add_norm`,
# `cuda_kernels.block_matvec_add_norm`): the grid's last block to finish (a counter each block bumps
# after its rows are written) computes, for each row t, hsum = resid + out (rounded to OutT, as MLX's
# add stores it), the sum of its squares in float32, then normed = nweight · OutT(hsum · rsqrt(mean +
# eps)) — `cuda_norm`'s arithmetic — and resets the counter. Needs tid, lane, wid, WARPS, THREADS.
_NORM_TAIL = r"""
    __shared__ unsigned int is_last;
    __shared__ float wsum[WARPS];
    __threadfence();  // this block's rows of out, visible to the block that reads them all
    __syncthreads();
    if (tid == 0) {
        unsigned int* ctr = const_cast<unsigned int*>(counter);
        is_last = atomicAdd(ctr, 1u) == gridDim.x - 1;
        if (is_last) *ctr = 0u;  // every other block has counted: ready for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // V values per 16-byte load where the rows allow (out through L2: other blocks wrote it)
    constexpr int V = ROWS % (16 / sizeof(OutT)) == 0 ? 16 / sizeof(OutT) : 1;
    for (int t = 0; t < NT; ++t) {
        float ss = 0.0f;
#pragma unroll 4
        for (int c = tid * V; c < ROWS; c += THREADS * V) {
            const int64_t at = int64_t(t) * ROWS + c;
            alignas(16) OutT rv[V], ov[V], hv[V];
            if constexpr (V > 1) {
                *reinterpret_cast<uint4*>(rv) = *reinterpret_cast<const uint4*>(resid + at);
                *reinterpret_cast<uint4*>(ov) = __ldcg(reinterpret_cast<const uint4*>(out + at));
            } else {
                rv[0] = resid[at];
                ov[0] = static_cast<OutT>(load_l2(out + at));
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                hv[j] = static_cast<OutT>(static_cast<float>(rv[j]) + static_cast<float>(ov[j]));
                ss += static_cast<float>(hv[j]) * static_cast<float>(hv[j]);
            }
            if constexpr (V > 1) *reinterpret_cast<uint4*>(hsum + at) = *reinterpret_cast<const uint4*>(hv);
            else hsum[at] = hv[0];
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
        if (lane == 0) wsum[wid] = ss;
        __syncthreads();
        float total = 0.0f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) total += wsum[k];
        __syncthreads();  // wsum read by all before the next row's sums
        const float n = rsqrtf(total / ROWS + __int_as_float(EPS_BITS));
#pragma unroll 4
        for (int c = tid * V; c < ROWS; c += THREADS * V) {
            const int64_t at = int64_t(t) * ROWS + c;  // hsum[at..]: this thread's own writes
            alignas(16) OutT hv[V], wv[V], yv[V];
            if constexpr (V > 1) {
                *reinterpret_cast<uint4*>(hv) = *reinterpret_cast<const uint4*>(hsum + at);
                *reinterpret_cast<uint4*>(wv) = *reinterpret_cast<const uint4*>(nweight + c);
            } else {
                hv[0] = hsum[at];
                wv[0] = nweight[c];
            }
#pragma unroll
            for (int j = 0; j < V; ++j)
                yv[j] = static_cast<OutT>(static_cast<float>(wv[j]) * static_cast<float>(static_cast<OutT>(static_cast<float>(hv[j]) * n)));
            if constexpr (V > 1) *reinterpret_cast<uint4*>(normed + at) = *reinterpret_cast<const uint4*>(yv);
            else normed[at] = yv[0];
        }
    }
"""

_KERNELS: dict = {}


def kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str = HEADER):
    """The `mx.fast.cuda_kernel` called `name`, made on first use (every module's kernels: MLX
    compiles each instantiation once it runs), from the sources `minified`."""
    if name not in _KERNELS:
        _KERNELS[name] = mx.fast.cuda_kernel(name=name, input_names=input_names, output_names=output_names,
                                             source=minified(source), header=minified(header))
    return _KERNELS[name]


def minified(source: str) -> str:
    """CUDA source without its comments, indentation and blank lines. MLX hashes a kernel's whole
    source each time it evaluates a launch (to find its compiled module): ~1.7 µs per 10 KB, and
    a decoded token launches ~240 of them from the host, which bounds the decoding rate."""
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.DOTALL)
    lines = (re.sub(r"(^|\s)//.*$", "", line).strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def available() -> bool:
    """True where the kernel can run: MLX's CUDA backend, default device the GPU (and not turned
    off with MLX_LLAMA_CUDA_KERNELS=0, for comparing with MLX's own kernels)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available() and os.environ.get("MLX_LLAMA_CUDA_KERNELS", "1") != "0"


def supported(bits: int, group_size: int, k: int) -> bool:
    return group_size == GROUP and bits in (2, 3, 4, 5, 6, 8) and k % GROUP == 0


def matvec(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, *, symmetric: bool = False,
           act: int = 0, epilogue: int = 0) -> mx.array:
    """x (..., K) with at most `MATVEC_MAX_ROWS` rows → x @ W.T (..., rows) in x's dtype.

    symmetric: every bias is −2^(bits−1) · its scale (`is_symmetric`): the biases are not read.
    act: x is [gate; up] (..., 2K) and the product is of act(gate) · up (1: SiLU, 2: GELU-tanh),
    computed as the activations are read (`ACTIVATIONS`). epilogue: W's rows are gate and up rows
    interleaved (`fusion`), and the result is act(gate) · up (..., rows / 2), computed as the
    products are written."""
    rows = w.shape[0]
    n_out = rows // 2 if epilogue else rows
    return kernel("mlx_llama_affine_matvec", ["x", "w", "scales", "biases"], ["out"], _MATVEC)(
        inputs=[x, w, scales, biases],  # read as nt rows: no reshape (each is a primitive the host evaluates)
        **_launch(x, rows, bits, symmetric, act, epilogue), output_shapes=[(*x.shape[:-1], n_out)], output_dtypes=[x.dtype],
    )[0]


def _launch(x: mx.array, rows: int, bits: int, symmetric: bool, act: int, epilogue: int, extra: tuple = ()) -> dict:
    """The template, grid and block of `_MATVEC` for x's rows (`extra`: more template arguments)."""
    k = x.shape[-1] // (2 if act else 1)
    nt = x.size // x.shape[-1]
    r = max(1, ROWS_PER_BLOCK // nt)  # a batch's rows share the registers (no spills past ~4 × 4)
    if epilogue:
        r = max(2, r - r % 2)  # gate and up rows in the same block
    return dict(template=[("NT", nt), ("K", k), ("ROWS", rows), ("BITS", bits), ("UNROLL", UNROLL), ("WARPS", WARPS),
                          ("R", r), ("SYM", int(symmetric)), ("ACT", act), ("EPI", epilogue), ("LEAN", int(LEAN)),
                          *extra, ("OutT", x.dtype)],
                grid=(-(-rows // r) * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1))


def matvec_add_norm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, resid: mx.array,
                    weight: mx.array, eps: float, counter: mx.array, *, symmetric: bool = False) -> tuple[mx.array, mx.array]:
    """(h, y): h = resid + x @ W.T, y = rms_norm(h, weight, eps), in one kernel (`_NORM_TAIL`): the
    product as `matvec` computes it, then the add and norm as `cuda_norm.add_rms_norm`'s.

    counter: a uint32 array of zeros (`new_counter`) whose first element the kernel bumps and resets
    behind MLX's back: two launches sharing it must not run at once (a layer's launches in the
    compiled decode step don't: `layers.deferring`)."""
    rows = w.shape[0]
    _, h, y = kernel("mlx_llama_affine_matvec_add_norm", ["x", "w", "scales", "biases", "resid", "nweight", "counter"],
                     ["out", "hsum", "normed"], _MATVEC + _NORM_TAIL)(
        inputs=[x, w, scales, biases, resid, weight, counter],
        **_launch(x, rows, bits, symmetric, 0, 0, extra=(("EPS_BITS", float_bits(eps)),)),
        output_shapes=[(*x.shape[:-1], rows)] * 3, output_dtypes=[x.dtype] * 3,
    )
    return h, y


def new_counter() -> mx.array:
    """A launch counter for `matvec_add_norm`: 64 zeros, the first one used. MLX's CUDA allocator
    keeps arrays of 8 bytes or less apart (not in device memory): the kernel's atomics on a (1,)
    counter took ~2.3 ms a launch on an H200, on one of 8 or more elements 0.04 ms (the matvec's)."""
    counter = mx.zeros((64,), mx.uint32)
    mx.eval(counter)
    return counter


ACTIVATIONS = {"silu": 1, "gelu_tanh": 2}  # the gated activations the matvecs compute as they read


def is_symmetric(scales: mx.array, biases: mx.array, bits: int) -> bool:
    """Whether every bias is −2^(bits−1) · its scale, exactly (the forms of Q4_0, Q5_0, Q8_0)."""
    return bool(mx.array_equal(biases, scales * -(2 ** (bits - 1))).item())
