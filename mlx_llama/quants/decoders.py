"""The numpy block decoders: the blocks of some rows, (rows, n_blocks, type_size) uint8 → MLX arrays.

Dense types become a dense array; the others MLX's affine form (`Affine`), exactly where the
file's float16 block scales map unchanged onto MLX's (see the package's docstring). Every block
scale is read by `finite_f16`: NaN or infinity there is an error naming the tensor. Q2_K and
Q6_K, which have no affine form, are in `subblock16`.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .affine import Affine, to_affine
from .ggml import SHIFT2, BadValues, bitplanes, crumbs, finite_f16, k_scales, nibbles, per_group


# An IEEE float is NaN or infinite when its exponent bits are all ones, i.e. when its bits
# without the sign are ≥ those of infinity: (sign mask, infinity) per dtype read.
_INFINITY = {"<f4": (np.uint32(0x7FFFFFFF), 0x7F800000), "<f2": (np.uint16(0x7FFF), 0x7C00),
             "<u2": (np.uint16(0x7FFF), 0x7F80)}
_CHECK_ROWS_BYTES = 1 << 24  # the finiteness check's temporaries: ~16 MB whatever the tensor


def dense(dtype: str) -> Callable[[np.ndarray], mx.array]:
    """The decoder of a dense type, read as numpy `dtype`: a straight copy, checked to hold no
    NaN or infinity (one pass over the bytes, in slices, before they are copied)."""

    def decode(blocks) -> mx.array:
        rows = blocks.shape[0]
        a = np.ascontiguousarray(blocks).reshape(rows, -1).view(dtype)
        _check_finite(a.view(f"<u{a.itemsize}"), *_INFINITY[dtype])
        if dtype == "<u2":  # bfloat16: numpy has no such type; MLX does
            return mx.array(a).view(mx.bfloat16)
        return mx.array(a)

    return decode


def _check_finite(bits: np.ndarray, magnitude, infinity: int) -> None:
    """bits: (rows, n) unsigned views of floats; raise `BadValues` naming the first bad row.
    A masked max is the cheapest numpy pass (numpy's isfinite on float16 is ~3× slower)."""
    step = max(1, _CHECK_ROWS_BYTES // max(1, bits[0].nbytes))
    for r in range(0, bits.shape[0], step):
        rows = bits[r : r + step] & magnitude
        if rows.max() >= infinity:
            raise BadValues(f"holds NaN or infinity (row {r + int(np.argmax(rows.max(axis=-1) >= infinity))})")


# -- legacy 32-weight blocks --------------------------------------------------------------------


def decode_q4_0(blocks) -> Affine:  # d: f16, qs: 16 bytes; w = d * (q - 8)
    d = finite_f16(blocks, 0)
    return to_affine(nibbles(blocks[..., 2:]), d, d * np.float16(-8), bits=4)


def decode_q4_1(blocks) -> Affine:  # d, m: f16, qs: 16 bytes; w = d * q + m
    return to_affine(nibbles(blocks[..., 4:]), finite_f16(blocks, 0), finite_f16(blocks, 2), bits=4)


def decode_q5_0(blocks) -> Affine:  # d: f16, qh: 4 bytes (bit j: weight j's 5th bit), qs: 16 bytes; w = d * (q - 16)
    d = finite_f16(blocks, 0)
    q = nibbles(blocks[..., 6:]) | (np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little") << 4)
    return to_affine(q, d, d * np.float16(-16), bits=5)


def decode_q5_1(blocks) -> Affine:  # d, m: f16, qh: 4 bytes, qs: 16 bytes; w = d * q + m
    q = nibbles(blocks[..., 8:]) | (np.unpackbits(blocks[..., 4:8], axis=-1, bitorder="little") << 4)
    return to_affine(q, finite_f16(blocks, 0), finite_f16(blocks, 2), bits=5)


def decode_q8_0(blocks) -> Affine:  # d: f16, qs: 32 int8; w = d * q = d * (q + 128) - 128 d
    d = finite_f16(blocks, 0)
    q = blocks[..., 2:] ^ np.uint8(0x80)  # int8 bits + 128 as uint8
    return to_affine(q, d, d * np.float16(-128), bits=8)


# IQ4_NL's 16 non-uniform levels. They sit on no coarser grid (neighbour gaps have gcd 1), so the
# smallest exact affine form is 8-bit: q = level + 128 ∈ [1, 241], scale d, bias −128·d.
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16)
_IQ4_Q = (IQ4_LEVELS + 128).astype(np.uint8)


def decode_iq4_nl(blocks) -> Affine:  # d: f16, qs: 16 bytes of 4-bit level indices (Q4_0 order); w = d * level
    d = finite_f16(blocks, 0)
    return to_affine(_IQ4_Q[nibbles(blocks[..., 2:])], d, d * np.float16(-128), bits=8)


# -- K-quant 256-weight super-blocks ------------------------------------------------------------


def decode_q4_k(blocks) -> Affine:
    # d, dmin: f16 | scales: 12 bytes (8 × 6-bit sc, 8 × 6-bit m) | qs: 128 bytes, 4-bit
    # w = d·sc·q − dmin·m per 32 weights → scale d·sc, bias −dmin·m: float16 in the quantized
    # form (d·sc has up to 17 significant bits, so it rounds), float32 in `exact`.
    d, dmin = finite_f16(blocks, 0)[..., None], finite_f16(blocks, 2)[..., None]  # (rows, nb, 1)
    sc, m = k_scales(blocks[..., 4:16])  # (rows, nb, 8)
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 1, 32)  # 4 × 32 bytes: sub-blocks 2j (low), 2j+1 (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)  # (rows, nb, 4, 2, 32)
    scale, bias = d.astype(np.float32) * sc, -(dmin.astype(np.float32) * m)  # exact in float32
    return to_affine(q, scale, bias, bits=4, exact=(scale, bias, 0))


def decode_q5_k(blocks) -> Affine:
    # d, dmin: f16 | scales: 12 bytes | qh: 32 bytes (bit planes) | qs: 128 bytes; as Q4_K, 5-bit q
    d, dmin = finite_f16(blocks, 0)[..., None], finite_f16(blocks, 2)[..., None]
    sc, m = k_scales(blocks[..., 4:16])
    qs = blocks[..., 48:].reshape(*blocks.shape[:-1], 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)
    q |= bitplanes(blocks[..., 16:48]) << 4
    scale, bias = d.astype(np.float32) * sc, -(dmin.astype(np.float32) * m)
    return to_affine(q, scale, bias, bits=5, exact=(scale, bias, 0))


def decode_q3_k(blocks) -> Affine:
    # hmask: 32 bytes (bit planes) | qs: 64 bytes, 2-bit | scales: 12 bytes, 16 × 6-bit | d: f16
    # w = d·(sc − 32)·q per 16 weights, q = low 2 bits − 4·(1 − high bit) ∈ [−4, 3].
    # All 256 weights are d times an integer k = (sc − 32)·q ∈ [−124, 128] — one 8-bit grid of step d,
    # but not [−128, 127]: k = 128 (sc − 32 = −32, q = −4) happens. So the grid runs downwards:
    # scale −d, bias 128·d (both exact in float16), q = 128 − k ∈ [0, 252].
    s = blocks[..., 96:108]
    low = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], axis=-1)  # (rows, nb, 16)
    high = ((s[..., None, 8:12] >> SHIFT2) & 3).reshape(*s.shape[:-1], 16)
    sc = (low | (high << 4)).astype(np.int16) - 32  # (rows, nb, 16)
    q = crumbs(blocks[..., 32:96]).astype(np.int16) - ((bitplanes(blocks[..., :32]) ^ 1) << 2)
    k = sc[..., None] * q.reshape(*q.shape[:-1], 16, 16)  # (rows, nb, 16, 16) int16
    d = per_group(finite_f16(blocks, 108), 8)
    return to_affine((128 - k).astype(np.uint8), -d, d * np.float16(128), bits=8)


def decode_iq4_xs(blocks) -> Affine:
    # d: f16 | scales_h: u16 (2 high bits per sub-block) | scales_l: 4 bytes (low nibbles) | qs: 128 bytes
    # w = d·(ls − 32)·level per 32 weights → 8-bit levels + 128 (as IQ4_NL), scale d·(ls − 32):
    # rounded to float16 in the quantized form, with bias −128·scale (exact in float16), so each
    # weight is off by its scale's rounding, ≤ 2⁻¹¹ relative; float32 in `exact`.
    d = finite_f16(blocks, 0)[..., None]
    sh = np.ascontiguousarray(blocks[..., 2:4]).view("<u2")  # (rows, nb, 1)
    sl = blocks[..., 4:8]
    low = np.stack([sl & 15, sl >> 4], axis=-1).reshape(*sl.shape[:-1], 8)  # sub-block i: nibble i%2 of byte i//2
    high = (sh >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    ls = (low | (high << 4)).astype(np.int16) - 32  # (rows, nb, 8)
    exact = d.astype(np.float32) * ls  # (rows, nb, 8), exact in float32
    scale = exact.astype(np.float16)
    qs = blocks[..., 8:].reshape(*blocks.shape[:-1], 8, 16)  # 8 sub-blocks × 16 bytes
    return to_affine(_IQ4_Q[nibbles(qs)], scale, scale * np.float16(-128), bits=8,
                     exact=(exact, np.zeros_like(exact), 128))
