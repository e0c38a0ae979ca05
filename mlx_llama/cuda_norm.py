"""A CUDA kernel for the residual add and the RMS norm that follows it (decoding on NVIDIA GPUs).

Each block adds its sublayer's output to the residual stream and the next sublayer starts by
normalising that sum: two kernels per sublayer with MLX's ops (the add, then `rms_norm`), each
a few microseconds however small the vector. One kernel does both here, a block per row (up to
MAX_THREADS threads, 8 values each, kept in registers between the two passes): h = x + delta
(rounded to the dtype, as MLX's add stores it), the sum of h² in float32, then
y = w · T(h · rsqrt(mean(h²) + eps)) — MLX's `rms_norm` arithmetic — so the results equal the two
ops' up to the rounding of the sum.
"""

from __future__ import annotations

import mlx.core as mx

from . import cuda_affine, layers
from .cuda_affine import float_bits
from .cuda_attention import HEADER

MAX_THREADS = 512  # threads per row: one group of 8 values each up to 4096 values
_SOURCE = """
    // each thread keeps its PER groups of 8 sums (and weights) in registers between the passes
    constexpr int VEC = 8, WARPS = THREADS / 32, PER = (N + THREADS * VEC - 1) / (THREADS * VEC);
    __shared__ float wsum[WARPS];
    const int64_t row = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float hv[PER][VEC], wv[PER][VEC];
    float ss = 0.0f;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int c = (p * THREADS + tid) * VEC;
        if (c < N) {
            float a[VEC], b[VEC];
            load8(x + row * N + c, a);
            load8(delta + row * N + c, b);
            load8(weight + c, wv[p]);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const OutT sum = static_cast<OutT>(a[j] + b[j]);
                h[row * N + c + j] = sum;
                hv[p][j] = static_cast<float>(sum);
                ss += hv[p][j] * hv[p][j];
            }
        }
    }
    ss = warp_sum(ss);
    if (lane == 0) wsum[warp] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) total += wsum[k];
    const float n = rsqrtf(total / N + __int_as_float(EPS_BITS));
#pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int c = (p * THREADS + tid) * VEC;
        if (c < N) {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                y[row * N + c + j] = static_cast<OutT>(wv[p][j] * static_cast<float>(static_cast<OutT>(hv[p][j] * n)));
        }
    }
"""

def available() -> bool:
    return cuda_affine.available() and cuda_affine.fused_kernels("norm")


def supported(x: mx.array, delta: mx.array, weight: mx.array) -> bool:
    """Rows of a multiple of 8 values (16-byte loads), x, delta and the weight of one dtype."""
    n = x.shape[-1]
    return n % 8 == 0 and delta.shape == x.shape and x.dtype == delta.dtype == weight.dtype and weight.shape == (n,)


def add_rms_norm(x: mx.array, delta: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(h, y): h = x + delta, y = rms_norm(h, weight, eps), both in x's dtype."""
    n = x.shape[-1]
    rows = x.size // n
    threads = min(MAX_THREADS, -(-n // 256) * 32)  # a multiple of 32, 8 values each
    h, y = cuda_affine.kernel("mlx_llama_add_rms_norm", ["x", "delta", "weight"], ["h", "y"], _SOURCE, HEADER)(
        inputs=[x, delta, weight], template=[("N", n), ("THREADS", threads), ("EPS_BITS", float_bits(eps)), ("OutT", x.dtype)],
        grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype],
    )
    return h, y


def add_norm(x: mx.array, delta, norm) -> tuple[mx.array, mx.array]:
    """(x + delta, norm(x + delta)) for an `nn.RMSNorm` `norm`: one kernel where `available`, else
    MLX's ops (delta None: x itself; a `layers.Pending` product: computed here, by the matvec that
    also adds and norms where the "tail" piece serves it)."""
    if delta is None:
        return x, norm(x)
    if isinstance(delta, layers.Pending):  # a product deferred to join this add and norm
        # (`deferred` made it only where the "tail" piece runs: what is left to check is the norm's side)
        if "weight" in norm and norm.weight.dtype == x.dtype == delta.x.dtype and delta.x.shape[:-1] == x.shape[:-1] \
                and norm.weight.shape == x.shape[-1:]:
            return layers.add_norm_after(delta, x, norm)
        delta = layers.resolve(delta)
    if available() and "weight" in norm and supported(x, delta, norm.weight):
        return add_rms_norm(x, delta, norm.weight, norm.eps)
    h = x + delta
    return h, norm(h)
