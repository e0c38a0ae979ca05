"""MLX's affine form, `w = scale · q + bias` per group of 32 weights, and building it from numpy.

`q` is `bits`-bit unsigned, packed as one little-endian bit stream into uint32 words; scales and
biases are float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .ggml import BadValues

GROUP = 32  # MLX group size used for every affine form (GGUF sub-blocks are 32 or 16 weights)


@dataclass
class Affine:
    weight: mx.array  # (rows, cols * bits / 32) uint32, packed q
    scales: mx.array  # (rows, cols / group_size) float16
    biases: mx.array  # (rows, cols / group_size) float16
    bits: int
    group_size: int
    # Where the float16 scales round gguf's (Q4_K, Q5_K, IQ4_XS): float32 (scales, biases) and an
    # integer zero point with gguf's w = scale·(q − zero) + bias, for `dequantize`. The quantized
    # form (what the loader keeps unless it dequantizes) has only the float16 ones.
    exact: tuple[mx.array, mx.array, int] | None = None

    def dequantize(self, dtype=mx.float32) -> mx.array:
        """The weights as gguf computes them (in float32), then cast to `dtype`."""
        gs, bits = self.group_size, self.bits
        if self.exact is None:
            # float16 scale × (≤ 8-bit q) needs ≤ 19 significant bits: exact in float32.
            s, b = self.scales.astype(mx.float32), self.biases.astype(mx.float32)
            return mx.dequantize(self.weight, s, b, group_size=gs, bits=bits).astype(dtype)
        s, b, zero = self.exact
        unit = mx.ones(s.shape, mx.float32)
        q = mx.dequantize(self.weight, unit, unit * -zero, group_size=gs, bits=bits)  # q − zero: exact integers
        # (q − zero)·scale is exact (≤ 24 significant bits) and + bias rounds once, as in gguf.
        w = q.reshape(*s.shape, gs) * s[..., None] + b[..., None]  # (rows, groups, gs)
        return w.reshape(q.shape).astype(dtype)


def affine_bits_per_weight(bits: int, group_size: int = GROUP) -> float:
    return bits + 2 * 16 / group_size  # packed q + a float16 scale and bias per group


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) uint8 values < 2**bits → (rows, n * bits / 32) uint32.

    MLX's layout for every width is one little-endian bit stream: value i occupies bits
    [bits·i, bits·(i+1)) of the row, so 3-, 5- and 6-bit values straddle bytes and words
    (checked against `mx.quantize` in the tests). `per` values fill a whole number of bytes.
    """
    rows, n = q.shape
    if bits == 8:
        return np.ascontiguousarray(q).view("<u4")
    per = 8 // math.gcd(bits, 8)  # 2 bits → 4 values/1 byte, 3 → 8/3, 4 → 2/1, 5 → 8/5, 6 → 4/3
    nbytes = per * bits // 8
    word = {1: "<u1", 3: "<u4", 5: "<u8"}[nbytes]
    q = q.reshape(rows, n // per, per)
    acc = q[..., 0].astype(word)
    for i in range(1, per):
        acc |= q[..., i].astype(word) << np.array(bits * i, dtype=word)
    packed = acc.view(np.uint8).reshape(rows, n // per, -1)[..., :nbytes]  # the low `nbytes` of each word
    return np.ascontiguousarray(packed).reshape(rows, -1).view("<u4")


def to_affine(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, exact=None) -> Affine:
    """q: (rows, ..., weights) uint8; scales, biases: one per 32 weights, float16 or float32
    (rounded to float16 here, the only rounding in any decoder — `exact` then keeps the float32
    (scales, biases, zero) for `Affine.dequantize`)."""
    rows = q.shape[0]
    s, b = scales.reshape(rows, -1).astype(np.float16), biases.reshape(rows, -1).astype(np.float16)
    # The file's scales are finite (`finite_f16`), but a scale times a zero point can overflow float16.
    if not (np.isfinite(s).all() and np.isfinite(b).all()):
        raise BadValues("block scale outside the float16 range")
    if exact is not None:
        es, eb, zero = exact
        exact = (mx.array(es.reshape(rows, -1).astype(np.float32)), mx.array(eb.reshape(rows, -1).astype(np.float32)), zero)
    return Affine(mx.array(pack(q.reshape(rows, -1), bits)), mx.array(s), mx.array(b), bits, GROUP, exact)
