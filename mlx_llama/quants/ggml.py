"""GGML's blocks: the type ids, and the bit fields that blocks are built of.

Every reader here is vectorized numpy over blocks (rows, n_blocks, type_size) uint8, or a byte
range of them.
"""

from __future__ import annotations

import numpy as np

# GGML type ids (gguf.GGMLQuantizationType), spelled out so the table reads on its own.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = 10, 11, 12, 13, 14, 20, 23, 30


def type_name(ggml_type: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


class BadValues(ValueError):
    """Values the model cannot use: NaN or infinity in a tensor or its block scales, or a scale
    float16 cannot hold (`decode_tensor` reports it as a `GGUFError` naming the tensor)."""


def f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block: (rows, n_blocks)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view("<f2")[..., 0]


def finite_f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """`f16`, checked to hold no NaN or infinity: a block scale that does would make every
    weight of its block NaN. The check costs one pass over 2 bytes of each block."""
    d = f16(blocks, start)
    if not np.isfinite(d).all():
        raise BadValues("a block scale is NaN or infinite")
    return d


def nibbles(qs: np.ndarray) -> np.ndarray:
    """Byte j holds weight j in its low and weight j + len(qs) in its high nibble (Q4_0 order):
    (..., k) → (..., 2k)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
_SHIFT1 = np.arange(8, dtype=np.uint8)[:, None]


def crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields, K-quant order: each 32 bytes hold 128 weights, weight 32·i + l in bits 2i..2i+1
    of byte l: (..., 32·c) → (..., 128·c)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, 32)  # (..., c, 1, 32)
    return ((qs >> SHIFT2) & 3).reshape(*qs.shape[:-3], -1)


def bitplanes(h: np.ndarray) -> np.ndarray:
    """K-quant high bits: 32 bytes hold 256 bits, weight 32·i + l in bit i of byte l: (..., 32) → (..., 256)."""
    return ((h[..., None, :] >> _SHIFT1) & 1).reshape(*h.shape[:-1], 256)


def k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes → 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4):
    bytes 0-3 and 4-7 hold sub-blocks 0-3 (low 6 bits), bytes 8-11 the low nibbles of 4-7,
    whose top 2 bits ride in the top bits of bytes 0-7."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1)
    return sc, m  # (rows, n_blocks, 8) uint8 each


def per_group(x: np.ndarray, groups_per_block: int) -> np.ndarray:
    """One value per block (rows, n_blocks) → one per 32-weight group (rows, n_blocks·groups_per_block)."""
    return np.repeat(x, groups_per_block, axis=-1)
