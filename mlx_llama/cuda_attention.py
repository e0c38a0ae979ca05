"""A CUDA kernel for one decoded token's attention over a whole cache buffer (the compiled step).

The compiled decode step (`decode_step`) attends over the cache's whole buffer, its length
fixed while the position moves. With MLX's ops that is a masked attention: MLX's fused kernels
take no mask array, so it runs as matmul, mask, softmax, matmul (~24 µs per layer on an H200 at
640 positions). This kernel reads the position from the device and touches only the keys and
values written so far (or the sliding window's):

* one block of THREADS threads per query head (a key/value head serves its group of query
  heads: GQA);
* scores: thread i takes positions i, i + THREADS, …: each a whole dot product q · k over the
  head's dimensions, the key row read 16 bytes at a time (4 loads in flight),
  q (scaled) from shared memory; the scores kept in shared memory (`MAX_POSITIONS` of them);
* softmax in float32: the block's maximum and sum (warp shuffles, then across warps);
* output: D / 8 threads per value row (8 dimensions each, one 16-byte load: coalesced rows),
  G = THREADS / (D / 8) rows at a time; the G partial sums added in shared memory and divided by
  the softmax sum once.

Sums in float32 (MLX's attention also accumulates in float32): equal up to summation order.
MLX_LLAMA_CUDA_ATTENTION=0 turns it off (the masked attention then).
"""

from __future__ import annotations

import os
import struct

import mlx.core as mx

from . import cuda_affine

THREADS = 512
MAX_POSITIONS = 4096  # scores in shared memory (16 KB); a longer buffer uses MLX's masked attention

_HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// 8 consecutive values as float, one or two 16-byte loads (p 16-byte aligned)
__device__ __forceinline__ void load8(const __half* p, float* v) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) { const float2 f = __half22float2(h[k]); v[2 * k] = f.x; v[2 * k + 1] = f.y; }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) { const float2 f = __bfloat1622float2(h[k]); v[2 * k] = f.x; v[2 * k + 1] = f.y; }
}
__device__ __forceinline__ void load8(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
"""

_SOURCE = """
    constexpr int WARPS = THREADS / 32, VEC = 8, LANES = D / VEC, G = THREADS / LANES;
    __shared__ float score[CAP];
    __shared__ float part[G * D];
    __shared__ float qs[D];
    __shared__ float wred[WARPS];
    const int head = blockIdx.x, kv = head / GROUP;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = position[0] + 1;
    const int first = WINDOW > 0 && n > WINDOW ? n - WINDOW : 0;
    const int count = n - first;
    const float scale = __int_as_float(SCALE_BITS);
    for (int d = tid; d < D; d += THREADS) qs[d] = static_cast<float>(q[int64_t(head) * D + d]) * scale;
    __syncthreads();
    const int64_t base = (int64_t(kv) * CAP + first) * D;
    // scores: a thread per position
    float local_max = __int_as_float(0xff800000);  // -inf
    for (int i = tid; i < count; i += THREADS) {
        const auto* row = keys + base + int64_t(i) * D;
        float s = 0.0f;
#pragma unroll 4
        for (int c = 0; c < D; c += VEC) {  // 4 loads in flight: registers for THREADS threads
            float v[VEC];
            load8(row + c, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) s += qs[c + j] * v[j];
        }
        score[i] = s;
        local_max = fmaxf(local_max, s);
    }
    local_max = warp_max(local_max);
    if (lane == 0) wred[warp] = local_max;
    __syncthreads();
    float m = wred[0];
    for (int k = 1; k < WARPS; ++k) m = fmaxf(m, wred[k]);
    __syncthreads();
    // exp (each thread its own positions) and the block's sum
    float local_sum = 0.0f;
    for (int i = tid; i < count; i += THREADS) {
        const float e = __expf(score[i] - m);
        score[i] = e;
        local_sum += e;
    }
    local_sum = warp_sum(local_sum);
    if (lane == 0) wred[warp] = local_sum;
    __syncthreads();
    float l = 0.0f;
    for (int k = 0; k < WARPS; ++k) l += wred[k];
    // the weighted sum of the values: LANES threads per row, G rows at a time
    const int c = (tid % LANES) * VEC, g = tid / LANES;
    if (g < G) {
        float acc[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
        for (int i = g; i < count; i += G) {
            const float w = score[i];
            float v[VEC];
            load8(values + base + int64_t(i) * D + c, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += w * v[j];
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) part[g * D + c + j] = acc[j];
    }
    __syncthreads();
    for (int d = tid; d < D; d += THREADS) {
        float v = 0.0f;
        for (int k = 0; k < G; ++k) v += part[k * D + d];
        out[int64_t(head) * D + d] = static_cast<OutT>(v / l);
    }
"""

_kernel = None


def available() -> bool:
    return cuda_affine.available() and os.environ.get("MLX_LLAMA_CUDA_ATTENTION", "1") != "0"


def supported(q: mx.array, keys: mx.array) -> bool:
    """One query row, a head size the kernel lays out (a multiple of 8 up to 256), a buffer whose
    scores fit in shared memory."""
    B, _, T, D = q.shape
    return B == 1 and T == 1 and D % 8 == 0 and D <= 256 and keys.shape[2] <= MAX_POSITIONS


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, position: mx.array, scale: float,
                     window: int = 0) -> mx.array:
    """q (1, Hq, 1, D) attending to keys/values (1, Hkv, capacity, D) at positions 0..position
    (the last `window` of them when window > 0) → (1, Hq, 1, D) in q's dtype."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="mlx_llama_decode_attention", input_names=["q", "keys", "values", "position"],
                                      output_names=["out"], source=_SOURCE, header=_HEADER)
    _, hq, _, d = q.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    scale_bits = struct.unpack("<i", struct.pack("<f", scale))[0]
    return _kernel(
        inputs=[q, keys, values, position.reshape(1).astype(mx.int32)],
        template=[("D", d), ("CAP", cap), ("GROUP", hq // hkv), ("WINDOW", window), ("SCALE_BITS", scale_bits),
                  ("THREADS", THREADS), ("OutT", q.dtype)],
        grid=(hq * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype],
    )[0]
