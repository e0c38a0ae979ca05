"""MLX arrays → GGUF blocks.

MLX's affine form is w = scale·q + bias per group with unsigned q; so are Q4_1 and Q5_1, per 32
weights with float16 d (scale) and m (bias). So a ≤ 4-bit or 5-bit MLX layer with group size a
multiple of 32 becomes Q4_1 or Q5_1 with the same q and its scales repeated per 32 weights: every
weight is kept when the scales are float16 (or fit in it). Nothing else maps exactly: the 8-bit
GGUF type Q8_0 has no bias, so other widths and modes are dequantized and quantized again
(`gguf.quants`, llama.cpp's reference rounding), as float weights are to the type asked for.

Block layouts (ggml-common.h), per 32 weights:
    Q4_1  d f16 | m f16 | qs[16]: byte j = q[j] | q[j+16] << 4
    Q5_1  d f16 | m f16 | qh u32: bit j = bit 4 of q[j] | qs[16]: low nibbles as Q4_1
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

BLOCK = 32
EXACT_TARGET = {2: T.Q4_1, 3: T.Q4_1, 4: T.Q4_1, 5: T.Q5_1}  # MLX affine bits → the GGUF type holding them


def unpack(weight: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed q, (rows, n·bits/32) uint32 → (rows, n) uint8: one little-endian bit stream per
    row, value i in bits [bits·i, bits·(i+1)) (`quants.affine.pack` is the inverse)."""
    rows = weight.shape[0]
    b = np.ascontiguousarray(weight).view(np.uint8).reshape(rows, -1)
    if bits == 8:
        return b
    if bits == 4:  # the common case, without going through single bits
        return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(rows, -1)
    stream = np.unpackbits(b, axis=-1, bitorder="little").reshape(rows, -1, bits)
    return np.packbits(stream, axis=-1, bitorder="little").reshape(rows, -1)  # bits ≤ 8: one byte per value


def per_block(values: np.ndarray, group_size: int) -> np.ndarray:
    """One value per MLX group (rows, n/group) → one per 32-weight block (rows, n/32)."""
    return np.repeat(values, group_size // BLOCK, axis=-1)


def affine_blocks(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, target: T) -> np.ndarray:
    """Q4_1 or Q5_1 blocks (rows, n/32 · type size) uint8 of affine q (rows, n) with float scales
    and biases (rows, n/group_size): the same q, d = scale and m = bias rounded to float16."""
    rows, n = q.shape
    q = q.reshape(rows, n // BLOCK, BLOCK)
    d = per_block(scales, group_size).astype(np.float16)[..., None].view(np.uint8)  # (rows, nb, 2)
    m = per_block(biases, group_size).astype(np.float16)[..., None].view(np.uint8)
    low = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    parts = [d.reshape(rows, -1, 2), m.reshape(rows, -1, 2)]
    if target == T.Q5_1:
        high = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
        parts.append(np.bitwise_or.reduce(high, axis=-1).astype("<u4")[..., None].view(np.uint8))
    parts.append(low)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def float16_exact(values: np.ndarray) -> bool:
    """Whether float values survive the round trip through float16 (Q4_1/Q5_1's d and m)."""
    v = values.astype(np.float32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(v.astype(np.float16).astype(np.float32), v))


def encode_float(values: np.ndarray, target: T) -> np.ndarray:
    """Float weights (rows, n) float32 → `target`'s bytes (F32/F16 as those dtypes), with
    llama.cpp's reference quantizers."""
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), target)


def decode(data: np.ndarray, target: T) -> np.ndarray:
    """gguf's float32 values of encoded weights (what llama.cpp computes with)."""
    return quants.dequantize(data, target).astype(np.float32, copy=False)
