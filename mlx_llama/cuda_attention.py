"""A CUDA kernel for one decoded token's attention over a whole cache buffer (the compiled step).

The compiled decode step (`decode_step`) attends over the cache's whole buffer, its length
fixed while the position moves. With MLX's ops that is a masked attention: MLX's fused kernels
take no mask array, so it runs as matmul, mask, softmax, matmul (~24 µs per layer on an H200 at
640 positions). This kernel reads the position from the device and touches only the keys and
values written so far (or the sliding window's). It also takes the new token's query, key and
value as the projection made them: RoPE (MLX's arithmetic) is applied to q and k inside it, the
new key and value are used from shared memory, written by the kernel into the cache buffer's row
(`KVCache.kv`: keys, then values; `MLX_LLAMA_CUDA_FUSE` without "inplace": returned, and the step
writes them with a scatter) — four kernels per layer fewer than MLX's RoPE of q and of k and two
writes (`MLX_LLAMA_CUDA_FUSE` without "rope" leaves RoPE to MLX):

* one block of THREADS threads per query head (a key/value head serves its group of query
  heads: GQA);
* rows: D / 8 threads per key or value row (8 dimensions each, one 16-byte load: coalesced
  rows), THREADS / (D / 8) rows at a time, 4 such rounds loaded before any is used; the first
  keys and values (128 positions for D = 128) are loaded first of all, while the new token's
  q, k, v are read and rotated, so that a short context costs about one memory latency;
* scores: each row's partial dot products summed across its threads with shuffles, kept in
  shared memory (`MAX_POSITIONS` of them);
* softmax in float32: the block's maximum and sum (warp shuffles, then across warps);
* output: each thread's 8 dimensions of its rows, weighted; the rows' partial sums added in shared
  memory and divided by the softmax sum once.

With MLX_LLAMA_ATTENTION_SPLIT_FROM=N (opt-in, unmeasured), buffers of N positions or more are cut
into chunks of CHUNK positions, a block per head and chunk (one block per head leaves most of a
large GPU idle when the context is long), each writing its unnormalised sum, maximum and
exp-sum; a second kernel (`_COMBINE`) rescales and adds them.

Sums in float32 (MLX's attention also accumulates in float32): equal up to summation order.
MLX_LLAMA_CUDA_ATTENTION=0 turns it off (the masked attention then).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import numpy as np

from . import cuda_affine
from .cuda_affine import float_bits

THREADS = 512
MAX_POSITIONS = 4096  # scores in shared memory (16 KB); a longer buffer uses MLX's masked attention
CHUNK = 512  # positions per block when a head's positions are split over several (`split_count`)

HEADER = """
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
    // q, k, v: the new token's (its query heads at Q_OFF, its key/value heads at K_OFF, V_OFF),
    // before RoPE when ROPE > 0 (1: adjacent pairs, 2: NEOX halves of the first ROPE_DIMS);
    // cache: the layer's buffer (HKV key heads, then HKV value heads, CAP positions each),
    // positions < position written; out: attention; kv_new: the new key (rotated) and value as
    // the cache stores them (written by one block per key/value head). With SPLITS > 1 each head's
    // positions are cut into SPLITS chunks of CHUNK, a block each: it writes its unnormalised sum
    // (partial) and its maximum and exp-sum (ml), and `_COMBINE` makes `out`.
    // Rows: LP threads per key or value row (LANES of them active, 8 dimensions each, one 16-byte
    // load), RPR rows at a time, U rounds of them loaded before any is used (SPAN positions).
    constexpr int WARPS = THREADS / 32, VEC = 8, LANES = D / VEC;
    constexpr int LP = LANES <= 1 ? 1 : LANES <= 2 ? 2 : LANES <= 4 ? 4 : LANES <= 8 ? 8 : LANES <= 16 ? 16 : 32;
    constexpr int RPR = THREADS / LP, U = 4, SPAN = RPR * U;
    __shared__ float score[CHUNK];
    __shared__ float vpart[RPR * D];
    __shared__ float qs[D], kn[D], vn[D];
    __shared__ float wred[WARPS];
    const int head = blockIdx.x / SPLITS, split = blockIdx.x % SPLITS, kv = head / GROUP;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int pos = position[0], n = pos + 1;
    const int first = (WINDOW > 0 && n > WINDOW ? n - WINDOW : 0) + split * CHUNK;  // this block's positions
    const int count = max(0, min(n - first, CHUNK));
    const int64_t base = (int64_t(kv) * CAP + first) * D, vbase = (int64_t(HKV + kv) * CAP + first) * D;
    const int c = tid % LP, r = tid / LP;  // this thread's 8 dimensions (c < LANES) and row slot
    const bool active = c < LANES;
    // the first SPAN keys and values, loaded while the new token's are read and rotated
    float kr[U][VEC], vr[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int i = r + RPR * u;
        if (active && i < count && first + i != pos) {
            load8(cache + base + int64_t(i) * D + c * VEC, kr[u]);
            load8(cache + vbase + int64_t(i) * D + c * VEC, vr[u]);
        }
    }
    for (int d = tid; d < D; d += THREADS) {
        qs[d] = static_cast<float>(q[Q_OFF + int64_t(head) * D + d]);
        kn[d] = static_cast<float>(k[K_OFF + int64_t(kv) * D + d]);
        vn[d] = static_cast<float>(v[V_OFF + int64_t(kv) * D + d]);
    }
    __syncthreads();
    if constexpr (ROPE > 0) {  // MLX's rope arithmetic: theta = scale · position · inv_freq, rounded to the dtype
        const float at = __int_as_float(ROPE_SCALE_BITS) * static_cast<float>(pos);
        for (int i = tid; i < ROPE_DIMS / 2; i += THREADS) {
            float inv_freq;
            if constexpr (FREQS) {
                inv_freq = 1.0 / freqs[i];
            } else {
                const float d = static_cast<float>(i) / static_cast<float>(ROPE_DIMS / 2);
                inv_freq = exp2(-d * __int_as_float(LOG2_BASE_BITS));
            }
            const float theta = at * inv_freq, c = cos(theta), s = sin(theta);
            const int a = ROPE == 1 ? 2 * i : i, b = ROPE == 1 ? 2 * i + 1 : i + ROPE_DIMS / 2;
            const float q1 = qs[a], q2 = qs[b], k1 = kn[a], k2 = kn[b];
            qs[a] = static_cast<float>(static_cast<OutT>(q1 * c - q2 * s));
            qs[b] = static_cast<float>(static_cast<OutT>(q1 * s + q2 * c));
            kn[a] = static_cast<float>(static_cast<OutT>(k1 * c - k2 * s));
            kn[b] = static_cast<float>(static_cast<OutT>(k1 * s + k2 * c));
        }
        __syncthreads();
    }
    const float scale = __int_as_float(SCALE_BITS);
    for (int d = tid; d < D; d += THREADS) {
        if (head % GROUP == 0 && split == 0) {
            kv_new[int64_t(kv) * D + d] = static_cast<OutT>(kn[d]);
            kv_new[int64_t(HKV + kv) * D + d] = static_cast<OutT>(vn[d]);
            if constexpr (INPLACE) {  // row `pos` of the buffer, which no block of this kernel reads
                OutT* buffer = const_cast<OutT*>(cache);
                buffer[(int64_t(kv) * CAP + pos) * D + d] = static_cast<OutT>(kn[d]);
                buffer[(int64_t(HKV + kv) * CAP + pos) * D + d] = static_cast<OutT>(vn[d]);
            }
        }
        qs[d] *= scale;
    }
    __syncthreads();
    float qv[VEC];  // this thread's 8 dimensions of q (scaled)
#pragma unroll
    for (int j = 0; j < VEC; ++j) qv[j] = active ? qs[c * VEC + j] : 0.0f;
    // scores: each row's dot product summed over its LP threads (shuffles within the warp)
    for (int i0 = 0; i0 < count; i0 += SPAN) {
        if (i0 > 0) {  // rounds after the first: load, then use
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = i0 + r + RPR * u;
                if (active && i < count && first + i != pos) load8(cache + base + int64_t(i) * D + c * VEC, kr[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + r + RPR * u;
            float s = 0.0f;
            if (active && i < count) {
                if (first + i == pos) {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) s += qv[j] * kn[c * VEC + j];
                } else {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) s += qv[j] * kr[u][j];
                }
            }
#pragma unroll
            for (int o = LP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            if (c == 0 && i < count) score[i] = s;
        }
    }
    __syncthreads();
    float local_max = __int_as_float(0xff800000);  // -inf
    for (int i = tid; i < count; i += THREADS) local_max = fmaxf(local_max, score[i]);
    local_max = warp_max(local_max);
    if (lane == 0) wred[warp] = local_max;
    __syncthreads();
    float m = wred[0];
    for (int w = 1; w < WARPS; ++w) m = fmaxf(m, wred[w]);
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
    for (int w = 0; w < WARPS; ++w) l += wred[w];
    // the weighted sum of the values: the first SPAN rows from registers, the rest loaded
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
    for (int i0 = 0; i0 < count; i0 += SPAN) {
        if (i0 > 0) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = i0 + r + RPR * u;
                if (active && i < count && first + i != pos) load8(cache + vbase + int64_t(i) * D + c * VEC, vr[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + r + RPR * u;
            if (active && i < count) {
                const float w = score[i];
                if (first + i == pos) {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[j] += w * vn[c * VEC + j];
                } else {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[j] += w * vr[u][j];
                }
            }
        }
    }
    if (active) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) vpart[r * D + c * VEC + j] = acc[j];
    }
    __syncthreads();
    for (int d = tid; d < D; d += THREADS) {
        float o = 0.0f;
        for (int w = 0; w < RPR; ++w) o += vpart[w * D + d];
        if constexpr (SPLITS == 1) out[int64_t(head) * D + d] = static_cast<OutT>(o / l);
        else partial[int64_t(blockIdx.x) * D + d] = o;
    }
    if (SPLITS > 1 && tid == 0) {
        ml[2 * blockIdx.x] = m;  // -inf for a chunk past the position: weight 0 below
        ml[2 * blockIdx.x + 1] = l;
    }
"""

_COMBINE = """
    // out = Σ_s partial_s · e^(m_s − M) / Σ_s l_s · e^(m_s − M), M the largest m_s (chunk 0 holds
    // at least the new token: M is finite)
    const int head = blockIdx.x, d = threadIdx.x;
    float top = __int_as_float(0xff800000);
    for (int s = 0; s < SPLITS; ++s) top = fmaxf(top, ml[2 * (head * SPLITS + s)]);
    float o = 0.0f, l = 0.0f;
    for (int s = 0; s < SPLITS; ++s) {
        const float w = __expf(ml[2 * (head * SPLITS + s)] - top);
        l += w * ml[2 * (head * SPLITS + s) + 1];
        o += w * partial[int64_t(head * SPLITS + s) * D + d];
    }
    out[int64_t(head) * D + d] = static_cast<OutT>(o / l);
"""



def available() -> bool:
    return cuda_affine.available() and os.environ.get("MLX_LLAMA_CUDA_ATTENTION", "1") != "0"


def serves(batch: int, head_dim: int, capacity: int) -> bool:
    """Whether the kernel serves a compiled step's attention: `available`, one sequence, a head
    size it lays out (a multiple of 8 up to 256), a chunk's scores fitting in shared memory."""
    fits = -(-capacity // split_count(capacity)) <= MAX_POSITIONS
    return available() and batch == 1 and head_dim % 8 == 0 and head_dim <= 256 and fits


def split_count(capacity: int) -> int:
    """Blocks per head: 1, or from a capacity of MLX_LLAMA_ATTENTION_SPLIT_FROM positions on (0,
    the default: never) one per CHUNK positions (then a second kernel combines them)."""
    start = int(os.environ.get("MLX_LLAMA_ATTENTION_SPLIT_FROM", "0") or 0)
    return -(-capacity // CHUNK) if start and capacity >= start else 1


@functools.cache
def _no_freqs() -> mx.array:
    """The `freqs` input of a RoPE without its own frequencies (unread): one array made once, not
    a new one per layer and step."""
    freqs = mx.zeros((1,), mx.float32)
    mx.eval(freqs)
    return freqs


def decode_attention(q: mx.array, k: mx.array, v: mx.array, cache: mx.array, position: mx.array, scale: float, *,
                     heads: int, window: int = 0, rope=None, offsets: tuple[int, int, int] = (0, 0, 0),
                     in_place: bool = False) -> tuple[mx.array, mx.array]:
    """The new token's attention over a layer's cache buffer → (out (1, 1, heads · D): the heads
    side by side, as the output projection reads them; its key and value as the cache holds them
    (1, 2 · Hkv, 1, D)), in the cache's dtype.

    q, k, v: the new token's `heads` query heads and Hkv key and value heads, flat from `offsets` on
    (one array may be passed as all three: the fused q/k/v projection's output); cache (1, 2 · Hkv,
    capacity, D): keys then values (`KVCache.kv`), positions < `position` written, the rest not
    read (the caller writes the new key and value at `position` afterwards); attention over
    0..position (the last `window` when window > 0).
    rope: None (q and k rotated already) or `model.RoPE.kernel_form()`'s (traditional, dims, scale,
    base, freqs (dims/2,) float32 or None): MLX's RoPE at `position` applied to q and k inside the
    kernel, its frequencies computed as MLX's kernel computes them (2^(−i/(dims/2) · log2 base), or
    1 / freqs). in_place: the kernel also writes the new key and value into `cache` itself, behind
    MLX's back (its arrays are immutable to MLX): only for a buffer nothing else holds and nothing
    reads before this kernel has run (`KVCache.kv` in the compiled step), saving the scatter."""
    hkv, cap, d = cache.shape[1] // 2, cache.shape[2], cache.shape[3]
    hq, splits = heads, split_count(cap)
    chunk = -(-cap // splits)
    traditional, dims, rope_scale, base, freqs = rope if rope is not None else (True, 0, 1.0, 2.0, None)
    log2_base = float(np.log2(np.float32(base or 2.0)))  # as MLX's std::log2 of the float base (unused with freqs)
    attend = cuda_affine.kernel("mlx_llama_decode_attention", ["q", "k", "v", "cache", "position", "freqs"],
                                ["out", "kv_new", "partial", "ml"], _SOURCE, HEADER)
    out, kv_new, partial, ml = attend(
        inputs=[q, k, v, cache, position.astype(mx.int32), freqs if freqs is not None else _no_freqs()],
        template=[("D", d), ("CAP", cap), ("HKV", hkv), ("GROUP", hq // hkv), ("WINDOW", window), ("SCALE_BITS", float_bits(scale)),
                  ("THREADS", THREADS), ("ROPE", 0 if rope is None else 1 if traditional else 2), ("ROPE_DIMS", dims),
                  ("ROPE_SCALE_BITS", float_bits(rope_scale)), ("FREQS", int(freqs is not None)),
                  ("LOG2_BASE_BITS", float_bits(log2_base)), ("Q_OFF", offsets[0]), ("K_OFF", offsets[1]),
                  ("V_OFF", offsets[2]), ("INPLACE", int(in_place)), ("SPLITS", splits), ("CHUNK", chunk),
                  ("OutT", cache.dtype)],
        grid=(hq * splits * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(1, 1, hq * d), (1, 2 * hkv, 1, d), (hq * splits, d) if splits > 1 else (1,),
                       (hq * splits, 2) if splits > 1 else (1,)],
        output_dtypes=[cache.dtype, cache.dtype, mx.float32, mx.float32],
    )
    if splits > 1:
        combine = cuda_affine.kernel("mlx_llama_decode_attention_combine", ["partial", "ml"], ["out"], _COMBINE, HEADER)
        out = combine(inputs=[partial, ml], template=[("D", d), ("SPLITS", splits), ("OutT", cache.dtype)],
                       grid=(hq * d, 1, 1), threadgroup=(d, 1, 1), output_shapes=[(1, 1, hq * d)],
                       output_dtypes=[cache.dtype])[0]
    return out, kv_new
