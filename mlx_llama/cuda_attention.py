"""Attention for one new token on NVIDIA GPUs, read straight from the KV cache's buffers.

While decoding, each head's query meets every cached key once. MLX's fused attention on CUDA
goes through cuDNN (~25 µs per layer on an H200 with 512 cached tokens) and first copies the
cache's valid slice (a strided view) into a contiguous array; this kernel reads the cache's own
buffers (B, kv_heads, capacity, D) up to the valid length, so nothing is copied:

* a block of 4 warps per (batch, head); warp w takes keys start + w, start + w + 4, …; its
  lanes split the head dimension (D / 32 values each, so a key row is one coalesced read), the
  score is reduced across the warp with shuffles, and each warp keeps a running softmax
  (maximum, sum, weighted values: the online softmax of flash-decoding) in float32;
* the four warps' running softmaxes are merged in shared memory and written once.

GQA: head h reads kv head h // (heads / kv_heads). A sliding window starts the keys at
length − window. Scores are scale · q·k, as `mx.fast.scaled_dot_product_attention` computes.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import cuda_affine

WARPS = 4

_SOURCE = r"""
    // q (B, H, 1, D); keys, values (B, KV, capacity, D), valid up to meta[0], from meta[1]; out (B, H, 1, D)
    constexpr int DL = D / 32;  // head dimensions per lane
    constexpr float NONE = -3.0e38f;  // the running maximum before any key
    const int64_t cap = keys_shape[2];
    const int bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / (H / KV);
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int length = meta[0], start = meta[1];
    const float sc = scale[0];
    const auto* qp = q + int64_t(bh) * D + lane * DL;
    const auto* kp = keys + (int64_t(b) * KV + kvh) * cap * D + lane * DL;
    const auto* vp = values + (int64_t(b) * KV + kvh) * cap * D + lane * DL;
    float qv[DL], acc[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) { qv[i] = static_cast<float>(qp[i]) * sc; acc[i] = 0.0f; }
    float m = NONE, l = 0.0f;
    for (int s = start + w; s < length; s += WARPS) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) dot = fmaf(qv[i], static_cast<float>(kp[int64_t(s) * D + i]), dot);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float m_new = fmaxf(m, dot);
        const float corr = __expf(m - m_new), p = __expf(dot - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[i] = fmaf(acc[i], corr, p * static_cast<float>(vp[int64_t(s) * D + i]));
        m = m_new;
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) { sm[w] = m; sl[w] = l; }
#pragma unroll
    for (int i = 0; i < DL; ++i) sacc[w][lane * DL + i] = acc[i];
    __syncthreads();
    if (w == 0) {
        float mm = NONE;
#pragma unroll
        for (int j = 0; j < WARPS; ++j) mm = fmaxf(mm, sm[j]);
        float total = 0.0f, f[WARPS];
#pragma unroll
        for (int j = 0; j < WARPS; ++j) { f[j] = sm[j] == NONE ? 0.0f : __expf(sm[j] - mm); total += sl[j] * f[j]; }
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            float v = 0.0f;
#pragma unroll
            for (int j = 0; j < WARPS; ++j) v += sacc[j][lane * DL + i] * f[j];
            out[int64_t(bh) * D + lane * DL + i] = static_cast<OutT>(v / total);
        }
    }
"""

_kernel = None
_scalars: dict = {}  # (length, start) and scale arrays, made once per step rather than per layer


def _scalar(value, dtype) -> mx.array:
    key = (value, dtype)
    if key not in _scalars:
        if len(_scalars) > 64:
            _scalars.clear()
        _scalars[key] = mx.array(value, dtype)
    return _scalars[key]


def available(head_dim: int) -> bool:
    """Opt-in (MLX_LLAMA_CUDA_ATTENTION=1): on an H200 it measured slower than cuDNN (92 against
    25 µs per layer, 512 cached tokens: a warp's keys one after another leave the GPU idle)."""
    return (os.environ.get("MLX_LLAMA_CUDA_ATTENTION") == "1" and cuda_affine.available()
            and head_dim % 32 == 0 and head_dim <= 512)


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, length: int, scale: float, window: int = 0) -> mx.array:
    """q (B, H, 1, D) against the cache buffers keys/values (B, KV, capacity, D), their first
    `length` positions (the last `window` of them when set) → (B, H, 1, D) in q's dtype."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="mlx_llama_decode_attention", input_names=["q", "keys", "values", "meta", "scale"],
                                      output_names=["out"], source=_SOURCE)
    B, H, _, D = q.shape
    KV = keys.shape[1]
    start = max(0, length - window) if window else 0
    return _kernel(
        inputs=[q, keys, values, _scalar((length, start), mx.int32), _scalar((scale,), mx.float32)],
        template=[("H", H), ("KV", KV), ("D", D), ("WARPS", WARPS), ("OutT", q.dtype)],
        grid=(B * H * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(B, H, 1, D)], output_dtypes=[q.dtype],
    )[0]
