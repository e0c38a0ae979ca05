"""A CUDA kernel for a decoded token's embedding row (NVIDIA GPUs, the "embed" piece).

With MLX's ops a quantized table's row costs a step eight kernels (three gathers — packed row,
scales, biases —, the scales and biases cast to float32, the dequantization, the scale and the
cast to the activations' dtype), each a launch the host pays for. One kernel does it here, a
thread per value: q from the row's little-endian bit stream, q · scale + bias in float32 (as
MLX's dequantize computes it, the product and sum contracted to one FMA, with the float16 scale
and bias as floats: `layers.QuantizedEmbedding`'s values), times the model's embedding scale
where it has one, rounded to the activations' dtype once.
"""

from __future__ import annotations

import mlx.core as mx

from . import cuda_affine
from .cuda_affine import float_bits
from .layers import QuantizedEmbedding

HEADER = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
GROUP = 32
MAX_TOKENS = 8  # a decoding step's rows; prompts keep MLX's ops

_SOURCE = r"""
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // value over NTOK rows of D
    if (i >= int64_t(NTOK) * D) return;
    const int tok = i / D, col = i % D;
    const int64_t row = static_cast<int64_t>(ids[tok]);
    constexpr int WORDS = D * BITS / 32;
    const uint32_t* packed = weight + row * WORDS;
    const int64_t off = int64_t(col) * BITS;
    const int word = off / 32, sh = off % 32;
    uint64_t bits = packed[word];
    if (sh + BITS > 32) bits |= uint64_t(packed[word + 1]) << 32;
    const float q = static_cast<float>(static_cast<uint32_t>(bits >> sh) & ((1u << BITS) - 1u));
    const int64_t g = row * (D / 32) + col / 32;
    float v = fmaf(q, static_cast<float>(scales[g]), static_cast<float>(biases[g]));
    if constexpr (SCALE_BITS != 0x3f800000) v = v * __int_as_float(SCALE_BITS);
    out[i] = static_cast<OutT>(v);
"""


def serves(table, tokens: mx.array) -> bool:
    """Whether the kernel serves this lookup: the piece on, an affine table in groups of 32 (no
    bias), a decoding step's few tokens."""
    return (cuda_affine.available() and cuda_affine.fused_kernels("embed") and type(table) is QuantizedEmbedding
            and table.group_size == GROUP and table.bits in (2, 3, 4, 5, 6, 8) and tokens.size <= MAX_TOKENS
            and (table["weight"].shape[1] * 32 // table.bits) % GROUP == 0)


def lookup(table, tokens: mx.array, scale: float, dtype: mx.Dtype) -> mx.array:
    """tokens (B, T) int → their rows of `table` (B, T, D) in `dtype`, times `scale` (0: none)."""
    d = table["weight"].shape[1] * 32 // table.bits
    n = tokens.size
    return cuda_affine.kernel("mlx_llama_embed", ["ids", "weight", "scales", "biases"], ["out"], _SOURCE, HEADER)(
        inputs=[tokens, table["weight"], table["scales"], table["biases"]],
        template=[("NTOK", n), ("D", d), ("BITS", table.bits), ("SCALE_BITS", float_bits(scale or 1.0)), ("OutT", dtype)],
        grid=(-(-n * d // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(*tokens.shape, d)], output_dtypes=[dtype],
    )[0]
