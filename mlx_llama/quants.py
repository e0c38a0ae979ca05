"""GGUF tensor blocks → MLX arrays.

One table, `FORMATS`, says for each GGUF type how its blocks are laid out and how they become
MLX arrays. A type either becomes a dense array or stays quantized in MLX's affine format,
`w = scale * q + bias` per group of `group_size` (32 here) weights, with `bits`-bit unsigned `q`
packed as one little-endian bit stream into uint32 words and float16 scales and biases.

How exact each form is (checked against `gguf.quants.dequantize` in `tests/test_quants.py`):

* exact — F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, IQ4_NL: the GGUF float16 block
  scale is stored unchanged (negated, or times a power of two for the zero point), so
  `mx.dequantize` in float32 gives bit for bit what gguf gives.
* scale rounded to float16 — Q4_K, Q5_K, IQ4_XS: the effective scale is d·sc (float16 times a
  6-bit integer, up to 17 significant bits), which MLX's float16 scales round to 11 bits:
  |Δw| ≤ 2⁻¹¹·(|d·sc|·q + |dmin·m|) (Q4_K/Q5_K), |Δw| ≤ 2⁻¹¹·|w| (IQ4_XS, no zero point).
* blocks — Q2_K, Q6_K scale every 16 weights, MLX every ≥ 32 (16 is rejected), so no affine
  form is exact. They stay the file's blocks (`Blocks`, the file's size), dequantized exactly by
  `dequantize_blocks` (MLX ops fused by `mx.compile`) each time the layer runs;
  `set_subblock16_form` picks dense float16 or a smaller re-quantized (lossy) affine form instead.
  When the loader expands every weight, they are gguf's float32 values (`decode_tensor(expand=True)`).

`Affine.dequantize` is exact for every affine type: where the float16 scales are rounded, the
decoder also hands over gguf's float32 scales (`Affine.exact`), so the CPU path that expands
weights to float32 at load gets gguf's values bit for bit; only the kept-quantized form carries
the float16 rounding.

Adding a type is adding a decoder and a row to `FORMATS`. A decoder takes the blocks of some
rows, `(rows, n_blocks, type_size)` uint8, and is vectorized numpy; `decode_tensor` hands it
~4M weights at a time, so its temporaries stay small whatever the tensor's size.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .gguf_file import GGUFError, TensorInfo

# GGML type ids (gguf.GGMLQuantizationType), spelled out so the table reads on its own.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = 10, 11, 12, 13, 14, 20, 23, 30

GROUP = 32  # MLX group size used for every affine form (GGUF sub-blocks are 32 or 16 weights)


@dataclass
class Dense:
    weight: mx.array  # (rows, cols) float


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
        w = q.reshape(*s.shape, gs) * s[..., None] + b[..., None]
        return w.reshape(q.shape).astype(dtype)


@dataclass(frozen=True)
class Format:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    decode: Callable[[np.ndarray], Dense | Affine | Blocks]  # (rows, n_blocks, type_size) uint8 → MLX arrays
    representation: str  # what it becomes in MLX and how exact, for `info`
    bits_per_weight: float  # MLX storage, as decoded (the loader casts dense weights to the model dtype)

    @property
    def file_bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def affine_bits_per_weight(bits: int, group_size: int = GROUP) -> float:
    return bits + 2 * 16 / group_size  # packed q + a float16 scale and bias per group


# -- bit twiddling ------------------------------------------------------------------------------


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
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
    packed = acc.view(np.uint8).reshape(rows, n // per, -1)[..., :nbytes]
    return np.ascontiguousarray(packed).reshape(rows, -1).view("<u4")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block: (rows, n_blocks)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view("<f2")[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Byte j holds weight j in its low and weight j + len(qs) in its high nibble (Q4_0 order):
    (..., k) → (..., 2k)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
_SHIFT1 = np.arange(8, dtype=np.uint8)[:, None]


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields, K-quant order: each 32 bytes hold 128 weights, weight 32·i + l in bits 2i..2i+1
    of byte l: (..., 32·c) → (..., 128·c)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, 32)  # (..., c, 1, 32)
    return ((qs >> _SHIFT2) & 3).reshape(*qs.shape[:-3], -1)


def _bitplanes(h: np.ndarray) -> np.ndarray:
    """K-quant high bits: 32 bytes hold 256 bits, weight 32·i + l in bit i of byte l: (..., 32) → (..., 256)."""
    return ((h[..., None, :] >> _SHIFT1) & 1).reshape(*h.shape[:-1], 256)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes → 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4):
    bytes 0-3 and 4-7 hold sub-blocks 0-3 (low 6 bits), bytes 8-11 the low nibbles of 4-7,
    whose top 2 bits ride in the top bits of bytes 0-7."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1)
    return sc, m  # (rows, n_blocks, 8) uint8 each


def _per_group(x: np.ndarray, groups_per_block: int) -> np.ndarray:
    """One value per block (rows, n_blocks) → one per 32-weight group (rows, n_blocks·groups_per_block)."""
    return np.repeat(x, groups_per_block, axis=-1)


class _OutOfRange(ValueError):
    pass


def _affine(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, exact=None) -> Affine:
    """q: (rows, ..., weights) uint8; scales, biases: one per 32 weights, float16 or float32
    (rounded to float16 here, the only rounding in any decoder — `exact` then keeps the float32
    (scales, biases, zero) for `Affine.dequantize`)."""
    rows = q.shape[0]
    s, b = scales.reshape(rows, -1).astype(np.float16), biases.reshape(rows, -1).astype(np.float16)
    if not (np.isfinite(s).all() and np.isfinite(b).all()):
        raise _OutOfRange("block scale outside the float16 range")
    if exact is not None:
        es, eb, zero = exact
        exact = (mx.array(es.reshape(rows, -1).astype(np.float32)), mx.array(eb.reshape(rows, -1).astype(np.float32)), zero)
    return Affine(mx.array(_pack(q.reshape(rows, -1), bits)), mx.array(s), mx.array(b), bits, GROUP, exact)


# -- decoders: legacy 32-weight blocks ----------------------------------------------------------


def decode_q4_0(blocks):  # d: f16, qs: 16 bytes; w = d * (q - 8)
    d = _f16(blocks, 0)
    return _affine(_nibbles(blocks[..., 2:]), d, d * np.float16(-8), bits=4)


def decode_q4_1(blocks):  # d, m: f16, qs: 16 bytes; w = d * q + m
    return _affine(_nibbles(blocks[..., 4:]), _f16(blocks, 0), _f16(blocks, 2), bits=4)


def decode_q5_0(blocks):  # d: f16, qh: 4 bytes (bit j: weight j's 5th bit), qs: 16 bytes; w = d * (q - 16)
    d = _f16(blocks, 0)
    q = _nibbles(blocks[..., 6:]) | (np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little") << 4)
    return _affine(q, d, d * np.float16(-16), bits=5)


def decode_q5_1(blocks):  # d, m: f16, qh: 4 bytes, qs: 16 bytes; w = d * q + m
    q = _nibbles(blocks[..., 8:]) | (np.unpackbits(blocks[..., 4:8], axis=-1, bitorder="little") << 4)
    return _affine(q, _f16(blocks, 0), _f16(blocks, 2), bits=5)


def decode_q8_0(blocks):  # d: f16, qs: 32 int8; w = d * q = d * (q + 128) - 128 d
    d = _f16(blocks, 0)
    q = blocks[..., 2:] ^ np.uint8(0x80)  # int8 bits + 128 as uint8
    return _affine(q, d, d * np.float16(-128), bits=8)


# IQ4_NL's 16 non-uniform levels. They sit on no coarser grid (neighbour gaps have gcd 1), so the
# smallest exact affine form is 8-bit: q = level + 128 ∈ [1, 241], scale d, bias −128·d.
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16)
_IQ4_Q = (IQ4_LEVELS + 128).astype(np.uint8)


def decode_iq4_nl(blocks):  # d: f16, qs: 16 bytes of 4-bit level indices (Q4_0 order); w = d * level
    d = _f16(blocks, 0)
    return _affine(_IQ4_Q[_nibbles(blocks[..., 2:])], d, d * np.float16(-128), bits=8)


# -- decoders: K-quant 256-weight super-blocks --------------------------------------------------


def decode_q4_k(blocks):
    # d, dmin: f16 | scales: 12 bytes (8 × 6-bit sc, 8 × 6-bit m) | qs: 128 bytes, 4-bit
    # w = d·sc·q − dmin·m per 32 weights → scale d·sc, bias −dmin·m: float16 in the quantized
    # form (d·sc has up to 17 significant bits, so it rounds), float32 in `exact`.
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # (rows, nb, 1)
    sc, m = _k_scales(blocks[..., 4:16])  # (rows, nb, 8)
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 1, 32)  # 4 × 32 bytes: sub-blocks 2j (low), 2j+1 (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)  # (rows, nb, 4, 2, 32)
    scale, bias = d.astype(np.float32) * sc, -(dmin.astype(np.float32) * m)  # exact in float32
    return _affine(q, scale, bias, bits=4, exact=(scale, bias, 0))


def decode_q5_k(blocks):
    # d, dmin: f16 | scales: 12 bytes | qh: 32 bytes (bit planes) | qs: 128 bytes; as Q4_K, 5-bit q
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    sc, m = _k_scales(blocks[..., 4:16])
    qs = blocks[..., 48:].reshape(*blocks.shape[:-1], 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)
    q |= _bitplanes(blocks[..., 16:48]) << 4
    scale, bias = d.astype(np.float32) * sc, -(dmin.astype(np.float32) * m)
    return _affine(q, scale, bias, bits=5, exact=(scale, bias, 0))


def decode_q3_k(blocks):
    # hmask: 32 bytes (bit planes) | qs: 64 bytes, 2-bit | scales: 12 bytes, 16 × 6-bit | d: f16
    # w = d·(sc − 32)·q per 16 weights, q = low 2 bits − 4·(1 − high bit) ∈ [−4, 3].
    # All 256 weights are d times an integer k = (sc − 32)·q ∈ [−124, 128] — one 8-bit grid of step d,
    # but not [−128, 127]: k = 128 (sc − 32 = −32, q = −4) happens. So the grid runs downwards:
    # scale −d, bias 128·d (both exact in float16), q = 128 − k ∈ [0, 252].
    s = blocks[..., 96:108]
    low = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], axis=-1)  # (rows, nb, 16)
    high = ((s[..., None, 8:12] >> _SHIFT2) & 3).reshape(*s.shape[:-1], 16)
    sc = (low | (high << 4)).astype(np.int16) - 32  # (rows, nb, 16)
    q = _crumbs(blocks[..., 32:96]).astype(np.int16) - ((_bitplanes(blocks[..., :32]) ^ 1) << 2)
    k = sc[..., None] * q.reshape(*q.shape[:-1], 16, 16)  # (rows, nb, 16, 16) int16
    d = _per_group(_f16(blocks, 108), 8)
    return _affine((128 - k).astype(np.uint8), -d, d * np.float16(128), bits=8)


def decode_iq4_xs(blocks):
    # d: f16 | scales_h: u16 (2 high bits per sub-block) | scales_l: 4 bytes (low nibbles) | qs: 128 bytes
    # w = d·(ls − 32)·level per 32 weights → 8-bit levels + 128 (as IQ4_NL), scale d·(ls − 32):
    # rounded to float16 in the quantized form, with bias −128·scale (exact in float16), so each
    # weight is off by its scale's rounding, ≤ 2⁻¹¹ relative; float32 in `exact`.
    d = _f16(blocks, 0)[..., None]
    sh = np.ascontiguousarray(blocks[..., 2:4]).view("<u2")  # (rows, nb, 1)
    sl = blocks[..., 4:8]
    low = np.stack([sl & 15, sl >> 4], axis=-1).reshape(*sl.shape[:-1], 8)  # sub-block i: nibble i%2 of byte i//2
    high = (sh >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    ls = (low | (high << 4)).astype(np.int16) - 32  # (rows, nb, 8)
    exact = d.astype(np.float32) * ls  # (rows, nb, 8), exact in float32
    scale = exact.astype(np.float16)
    qs = blocks[..., 8:].reshape(*blocks.shape[:-1], 8, 16)
    return _affine(_IQ4_Q[_nibbles(qs)], scale, scale * np.float16(-128), bits=8,
                   exact=(exact, np.zeros_like(exact), 128))


# -- Q2_K and Q6_K: 16-weight sub-blocks, no exact affine form ----------------------------------
# Two neighbouring sub-blocks share one MLX group of 32 but have unrelated scales (and, for Q2_K,
# unrelated offsets), so no affine grid is exact. Three forms (`set_subblock16_form`):
#   "blocks" (default) the file's blocks, split into their fields (`Blocks`), dequantized by
#            `dequantize_blocks` each time the weight is used: the file's size, gguf's values;
#   "dense"  gguf's values stored as float16 (16 bpw, each weight rounded once);
#   bits     re-quantized to a `bits`-bit affine form (lossy).
# The CPU path that expands every weight at load gets gguf's float32 values (`subblock16_values`).


def q2_k_values(blocks) -> np.ndarray:
    # scales: 16 bytes (low nibble sc, high nibble m) | qs: 64 bytes, 2-bit | d, dmin: f16
    # w = d·sc·q − dmin·m per 16 weights → (rows, nb, 16, 16) float32, as gguf computes it
    s = blocks[..., :16]
    dl = (_f16(blocks, 80)[..., None].astype(np.float32) * (s & 15))[..., None]
    ml = (_f16(blocks, 82)[..., None].astype(np.float32) * (s >> 4))[..., None]
    q = _crumbs(blocks[..., 16:80]).reshape(*blocks.shape[:-1], 16, 16)
    return dl * q - ml


def q6_k_values(blocks) -> np.ndarray:
    # ql: 128 bytes, low 4 bits | qh: 64 bytes, high 2 bits | scales: 16 int8 | d: f16
    # w = d·sc·(q − 32) per 16 weights → (rows, nb, 16, 16) float32, exact (≤ 24 significant bits)
    ql = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 1, 64)  # 2 halves of 128 weights
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)
    q = (ql | (_crumbs(blocks[..., 128:192]) << 4)).view(np.int8) - np.int8(32)
    dl = (_f16(blocks, 208)[..., None].astype(np.float32) * blocks[..., 192:208].view(np.int8))[..., None]
    return dl * q.reshape(*q.shape[:-1], 16, 16)


@dataclass
class Blocks:
    """A Q2_K/Q6_K tensor kept as the file's blocks, split into fields of shape (rows, n_blocks, …):
    Q6_K: qs (192 bytes: 4 low bits, then 2 high bits), scales (16 int8), d (float16);
    Q2_K: scales (16 bytes: sc low nibble, m high), qs (64 bytes, 2-bit), d, dmin (float16)."""

    ggml_type: int
    fields: dict[str, mx.array]

    def dequantize(self, dtype=mx.float32) -> mx.array:
        return dequantize_blocks(self.ggml_type, self.fields, dtype)


def _split_blocks(ggml_type: int, blocks: np.ndarray) -> Blocks:
    f16 = lambda at: mx.array(_f16(blocks, at))  # noqa: E731
    if ggml_type == Q6_K:
        fields = {"qs": mx.array(blocks[..., :192]), "scales": mx.array(blocks[..., 192:208].view(np.int8)), "d": f16(208)}
    else:
        fields = {"scales": mx.array(blocks[..., :16]), "qs": mx.array(blocks[..., 16:80]), "d": f16(80), "dmin": f16(82)}
    return Blocks(ggml_type, fields)


_MX_SHIFT2 = mx.array([0, 2, 4, 6], dtype=mx.uint8)[:, None]


def _mx_crumbs(qs: mx.array) -> mx.array:
    """`_crumbs` in MLX: (..., 32·c) uint8 → (..., 128·c)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, 32)
    return ((qs >> _MX_SHIFT2) & 3).reshape(*qs.shape[:-3], -1)


def _q6_k_mx(qs, scales, d):
    lead = d.shape
    ql = qs[..., :128].reshape(*lead, 2, 1, 64)
    ql = mx.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*lead, 256)
    q = (ql | (_mx_crumbs(qs[..., 128:]) << 4)).astype(mx.int8) - 32
    dl = (d[..., None].astype(mx.float32) * scales.astype(mx.float32))[..., None]
    return (dl * q.reshape(*lead, 16, 16)).reshape(*lead[:-1], -1)


def _q2_k_mx(scales, qs, d, dmin):
    lead = d.shape
    dl = (d[..., None].astype(mx.float32) * (scales & 15))[..., None]
    ml = (dmin[..., None].astype(mx.float32) * (scales >> 4))[..., None]
    q = _mx_crumbs(qs).reshape(*lead, 16, 16)
    return (dl * q - ml).reshape(*lead[:-1], -1)


_BLOCK_VALUES = {Q6_K: _q6_k_mx, Q2_K: _q2_k_mx}
_compiled: dict = {}


def dequantize_blocks(ggml_type: int, fields, dtype: mx.Dtype = mx.float32) -> mx.array:
    """gguf's float32 values of `Blocks` fields (any leading shape, e.g. rows picked by an
    embedding lookup), cast to `dtype`: (..., n_blocks, …) → (..., n_blocks · 256). Elementwise
    work that `mx.compile` fuses into one pass over the blocks, writing only the `dtype` result."""
    fn = _compiled.get((ggml_type, dtype))
    if fn is None:
        values = _BLOCK_VALUES[ggml_type]
        fn = _compiled[ggml_type, dtype] = mx.compile(lambda **f: values(**f).astype(dtype))
    return fn(**fields)


_SUBBLOCK16_VALUES = {Q2_K: q2_k_values, Q6_K: q6_k_values}  # numpy, as gguf computes them
SUBBLOCK16 = tuple(_SUBBLOCK16_VALUES)


def subblock16_values(ggml_type: int, blocks: np.ndarray) -> Dense:
    """gguf's float32 values of Q2_K/Q6_K blocks (rows, nb, type_size), as a dense array."""
    w = _SUBBLOCK16_VALUES[ggml_type](blocks)
    return Dense(mx.array(w.reshape(blocks.shape[0], -1)))


def requantize(w: np.ndarray, bits: int) -> Affine:
    """Lossy: float weights (rows, ..., n) → `bits`-bit affine, group 32, round to nearest.

    Per group: bias = min and scale = (max − min) / (2**bits − 1) in float16, the scale rounded
    up so that the grid still reaches max; then |Δw| ≤ scale / 2 + |min − bias| (half a step,
    plus the float16 rounding of the group's minimum).
    """
    rows = w.shape[0]
    g = w.reshape(rows, -1, GROUP).astype(np.float32, copy=False)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    top = 2**bits - 1
    exact = (hi - lo) / top
    scale = exact.astype(np.float16)
    low = scale.astype(np.float32) < exact
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    bias = lo.astype(np.float16)
    s32 = scale.astype(np.float32)
    inv = np.divide(1, s32, out=np.zeros_like(s32), where=s32 > 0)
    q = np.clip(np.rint((g - bias.astype(np.float32)[..., None]) * inv[..., None]), 0, top).astype(np.uint8)
    return _affine(q, scale, bias, bits)


def _subblock16_format(name: str, ggml_type: int, type_size: int, form) -> Format:
    if form == "blocks":
        return Format(name, 256, type_size, lambda blocks: _split_blocks(ggml_type, blocks),
                      "the file's blocks, dequantized when used (exact: gguf's values, in the compute dtype)",
                      8 * type_size / 256)
    if form == "dense":
        return Format(name, 256, type_size, lambda blocks: subblock16_values(ggml_type, blocks),
                      "dense float16 (each weight rounded once to float16)", 16)
    return Format(name, 256, type_size, lambda blocks: requantize(_SUBBLOCK16_VALUES[ggml_type](blocks), form),
                  f"affine {form}-bit, group 32, re-quantized (lossy: ≤ half a step + float16 rounding of the min)",
                  affine_bits_per_weight(form))


# -- dense types --------------------------------------------------------------------------------


def _dense(dtype: str) -> Callable[[np.ndarray], Dense]:
    def decode(blocks):
        rows = blocks.shape[0]
        a = np.ascontiguousarray(blocks).reshape(rows, -1).view(dtype)
        if dtype == "<u2":  # bfloat16: numpy has no such type; MLX does
            return Dense(mx.array(a).view(mx.bfloat16))
        return Dense(mx.array(a))

    return decode


_EXACT = "exact"
_K_SCALE = "float16 scale d·sc and bias −dmin·m rounded; exact when dequantized"
_XS_SCALE = "float16 scale d·(ls − 32) rounded, ≤ 2⁻¹¹ relative; exact when dequantized"

FORMATS: dict[int, Format] = {
    F32: Format("F32", 1, 4, _dense("<f4"), "dense float32 (exact)", 32),
    F16: Format("F16", 1, 2, _dense("<f2"), "dense float16 (exact)", 16),
    BF16: Format("BF16", 1, 2, _dense("<u2"), "dense bfloat16 (exact)", 16),
    Q4_0: Format("Q4_0", 32, 18, decode_q4_0, f"affine 4-bit, group 32 ({_EXACT})", affine_bits_per_weight(4)),
    Q4_1: Format("Q4_1", 32, 20, decode_q4_1, f"affine 4-bit, group 32 ({_EXACT})", affine_bits_per_weight(4)),
    Q5_0: Format("Q5_0", 32, 22, decode_q5_0, f"affine 5-bit, group 32 ({_EXACT})", affine_bits_per_weight(5)),
    Q5_1: Format("Q5_1", 32, 24, decode_q5_1, f"affine 5-bit, group 32 ({_EXACT})", affine_bits_per_weight(5)),
    Q8_0: Format("Q8_0", 32, 34, decode_q8_0, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    IQ4_NL: Format("IQ4_NL", 32, 18, decode_iq4_nl, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    Q2_K: _subblock16_format("Q2_K", Q2_K, 84, "blocks"),
    Q3_K: Format("Q3_K", 256, 110, decode_q3_k, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    Q4_K: Format("Q4_K", 256, 144, decode_q4_k, f"affine 4-bit, group 32 ({_K_SCALE})", affine_bits_per_weight(4)),
    Q5_K: Format("Q5_K", 256, 176, decode_q5_k, f"affine 5-bit, group 32 ({_K_SCALE})", affine_bits_per_weight(5)),
    Q6_K: _subblock16_format("Q6_K", Q6_K, 210, "blocks"),
    IQ4_XS: Format("IQ4_XS", 256, 136, decode_iq4_xs, f"affine 8-bit, group 32 ({_XS_SCALE})", affine_bits_per_weight(8)),
}


def set_subblock16_form(form: str | int = "blocks") -> None:
    """Choose how Q2_K and Q6_K tensors are kept when the weights stay compact (they have no
    exact affine form; the CPU path that expands weights at load is unaffected: gguf's values).

    "blocks" (the default): the file's blocks, the file's size (Q6_K 6.5625, Q2_K 2.625 bits per
    weight), dequantized to the compute dtype each time the layer runs — exact, but every use
    pays a pass over the blocks. "dense": float16, 16 bits per weight, each weight gguf's value
    rounded once (a plain float16 matmul: faster for long prompts, slower to decode on a GPU
    than the CUDA block kernels, README). `bits` in {2, 3, 4, 5, 6, 8}: `bits`-bit affine,
    group 32, re-quantized by `requantize` — `bits` + 1 bits per weight, error ≤ half a step of
    each 32-weight group's range plus the float16 rounding of its minimum (8 → 9 bpw, error ≈
    (max − min) / 510 per group; 6 → 7 bpw, ≈ (max − min) / 126; Q6_K's own step is about
    (max − min) / 63). On SmolLM2's Q6_K file, 8 bits moves the logits by up to ~0.5 and 6 bits
    by ~2.8 (dense float16: 0.02). Affects tensors decoded afterwards (call before `load`).
    """
    if form not in ("blocks", "dense", 2, 3, 4, 5, 6, 8):
        raise ValueError(f"Q2_K/Q6_K form must be 'blocks', 'dense' or 2, 3, 4, 5, 6, 8 bits (MLX's affine widths), not {form!r}")
    FORMATS[Q2_K] = _subblock16_format("Q2_K", Q2_K, 84, form)
    FORMATS[Q6_K] = _subblock16_format("Q6_K", Q6_K, 210, form)


def type_name(ggml_type: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# Decode at most this many weights at a time: the numpy temporaries (a few bytes per weight) then
# stay ~10-100 MB whatever the tensor's size; the pieces are joined by `mx.concatenate`.
CHUNK_WEIGHTS = 1 << 22


def _join(parts: list[Dense | Affine | Blocks]) -> Dense | Affine | Blocks:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, Blocks):
        return Blocks(first.ggml_type, {k: mx.concatenate([p.fields[k] for p in parts]) for k in first.fields})
    if isinstance(first, Dense):
        return Dense(mx.concatenate([p.weight for p in parts]))
    exact = None
    if first.exact is not None:
        exact = (mx.concatenate([p.exact[0] for p in parts]), mx.concatenate([p.exact[1] for p in parts]), first.exact[2])
    return Affine(*(mx.concatenate([getattr(p, f) for p in parts]) for f in ("weight", "scales", "biases")),
                  first.bits, first.group_size, exact)


class _FilePages:
    """Hands a memory-mapped tensor's pages back to the OS once decoded, so that loading holds
    the decoded model and not also the whole file in resident memory. Only read-only file
    mappings qualify (a read-only shared mapping re-reads the file if touched again)."""

    def __init__(self, a: np.ndarray):
        self.map, self.start = None, 0
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, mmap.mmap) and not a.flags.writeable and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self.start = np.frombuffer(base, np.uint8).ctypes.data
                self.map = base
            except (ValueError, TypeError):  # a closed or unusual mapping: leave it alone
                pass

    def release(self, a: np.ndarray):
        if self.map is None:
            return
        lo = a.ctypes.data - self.start
        hi = lo + a.nbytes
        lo = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range only
        hi = hi // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            try:
                self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                self.map = None


def decode_tensor(path: str, t: TensorInfo, dense_dtype: mx.Dtype = mx.float16, expand: bool = False) -> Dense | Affine | Blocks:
    """Turn one memory-mapped GGUF tensor into MLX arrays, checking its size against its type.

    Each type becomes its `FORMATS` form. With expand=True (the loader expanding every weight),
    Q2_K and Q6_K come out dense instead, gguf's float32 values cast to `dense_dtype`; a dense
    Q2_K/Q6_K form is cast to `dense_dtype` too.
    """
    fmt = FORMATS.get(t.ggml_type)
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise GGUFError(path, f"tensor {t.name!r} has unsupported type {type_name(t.ggml_type)} (supported: {supported})")
    cols = t.shape[-1]
    rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
    if cols % fmt.block_size:
        raise GGUFError(path, f"tensor {t.name!r}: row length {cols} is not a multiple of {fmt.name}'s block size {fmt.block_size}")
    raw = np.asarray(t.data).view(np.uint8).reshape(-1)
    expected = rows * (cols // fmt.block_size) * fmt.type_size
    if raw.size != expected:
        raise GGUFError(path, f"tensor {t.name!r}: {raw.size} bytes, but {fmt.name} {t.shape} needs {expected}")
    blocks = raw.reshape(rows, cols // fmt.block_size, fmt.type_size)
    pages = _FilePages(raw)
    # Dense types are a straight copy (no temporaries): one piece. Quantized ones go in row chunks.
    step = rows if fmt.block_size == 1 else max(1, CHUNK_WEIGHTS // cols)
    parts = []
    try:
        with np.errstate(over="ignore"):  # a scale overflowing float16 is caught by `_affine`
            for r in range(0, rows, step):
                chunk = blocks[r : r + step]
                part = subblock16_values(t.ggml_type, chunk) if expand and t.ggml_type in SUBBLOCK16 else fmt.decode(chunk)
                if isinstance(part, Dense) and fmt.block_size > 1:
                    part.weight = part.weight.astype(dense_dtype)
                    mx.eval(part.weight)  # now, so that only one chunk is ever held in float32
                parts.append(part)
                pages.release(chunk)
    except _OutOfRange as e:
        raise GGUFError(path, f"tensor {t.name!r}: {e}") from None
    out = _join(parts)  # lazy: the loader's mx.eval joins the pieces (briefly 2× this tensor's MLX size)
    if len(t.shape) == 1:  # vectors (norm weights) are stored as one row
        out.weight = out.weight.reshape(-1)
    return out
