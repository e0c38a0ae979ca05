"""A CUDA kernel for one decoded token's attention over a whole cache buffer (the compiled step).

The compiled decode step (`decode_step`) attends over the cache's whole buffer, its length
fixed while the position moves. With MLX's ops that is a masked attention: MLX's fused kernels
take no mask array, so it runs as matmul, mask, softmax, matmul (~24 µs per layer on an H200 at
640 positions). This kernel reads the position from the device and touches only the keys and
values written so far (or the sliding window's):

* one block per query head (a key/value head serves its group of query heads: GQA);
* scores: each warp takes positions warp, warp + WARPS, …; a position's dot product q · k is
  split over the warp's lanes (D / 32 consecutive values each: coalesced rows), summed with
  shuffles, scaled, kept in shared memory (`MAX_POSITIONS` of them);
* softmax in float32: the block's maximum, exp, the block's sum;
* output: thread t takes dimension t % D for positions g, g + G, … (G = THREADS / D groups:
  coalesced rows of V), the groups summed in shared memory, divided by the sum once.

Sums in float32 (MLX's attention also accumulates in float32): equal up to summation order.
"""

from __future__ import annotations

import struct

import mlx.core as mx

from . import cuda_affine

THREADS = 256
MAX_POSITIONS = 8192  # scores in shared memory (32 KB); a longer buffer uses MLX's masked attention

_SOURCE = """
    constexpr int WARPS = THREADS / 32, PER_LANE = D / 32, G = THREADS / D;
    __shared__ float score[CAP];
    __shared__ float red[THREADS];
    __shared__ float qs[D];
    const int head = blockIdx.x, kv = head / GROUP;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = position[0] + 1;
    const int first = WINDOW > 0 && n > WINDOW ? n - WINDOW : 0;
    const int count = n - first;
    const float scale = __int_as_float(SCALE_BITS);
    for (int d = tid; d < D; d += THREADS) qs[d] = static_cast<float>(q[int64_t(head) * D + d]);
    __syncthreads();
    const int64_t base = int64_t(kv) * CAP * D;
    // scores: a warp per position, lanes over the head's dimensions
    float local_max = __int_as_float(0xff800000);  // -inf
    for (int i = warp; i < count; i += WARPS) {
        const int64_t row = base + int64_t(first + i) * D + lane * PER_LANE;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) s += qs[lane * PER_LANE + j] * static_cast<float>(keys[row + j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        s *= scale;
        if (lane == 0) score[i] = s;
        local_max = fmaxf(local_max, s);
    }
    // the block's maximum
    red[tid] = local_max;
    __syncthreads();
    for (int o = THREADS / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
        __syncthreads();
    }
    const float m = red[0];
    __syncthreads();
    // exp and the block's sum
    float local_sum = 0.0f;
    for (int i = tid; i < count; i += THREADS) {
        const float e = __expf(score[i] - m);
        score[i] = e;
        local_sum += e;
    }
    red[tid] = local_sum;
    __syncthreads();
    for (int o = THREADS / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] += red[tid + o];
        __syncthreads();
    }
    const float l = red[0];
    __syncthreads();
    // the weighted sum of the values: thread t, dimension t % D, positions t / D, + G, …
    const int d = tid % D, g = tid / D;
    float acc = 0.0f;
    if (g < G) {
        for (int i = g; i < count; i += G) acc += score[i] * static_cast<float>(values[base + int64_t(first + i) * D + d]);
    }
    red[tid] = acc;
    __syncthreads();
    if (tid < D) {
        float v = 0.0f;
        for (int k = 0; k < G; ++k) v += red[k * D + tid];
        out[int64_t(head) * D + tid] = static_cast<OutT>(v / l);
    }
"""

_kernel = None


def available() -> bool:
    return cuda_affine.available()


def supported(q: mx.array, keys: mx.array) -> bool:
    """One query row of a head size the kernel lays out (a multiple of 32, at most THREADS), a
    buffer whose scores fit in shared memory."""
    B, _, T, D = q.shape
    return B == 1 and T == 1 and D % 32 == 0 and D <= THREADS and keys.shape[2] <= MAX_POSITIONS


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, position: mx.array, scale: float,
                     window: int = 0) -> mx.array:
    """q (1, Hq, 1, D) attending to keys/values (1, Hkv, capacity, D) at positions 0..position
    (the last `window` of them when window > 0) → (1, Hq, 1, D) in q's dtype."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="mlx_llama_decode_attention", input_names=["q", "keys", "values", "position"],
                                      output_names=["out"], source=_SOURCE)
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
