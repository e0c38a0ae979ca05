"""Q2_K and Q6_K: 16-weight sub-blocks, no exact affine form.

Two neighbouring sub-blocks share one MLX group of 32 but have unrelated scales (and, for Q2_K,
unrelated offsets), so no affine grid is exact. Three forms (`set_subblock16_form`):

  "blocks" (default) the file's blocks, split into their fields (`Blocks`), dequantized by
           `dequantize_blocks` each time the weight is used: the file's size, gguf's values;
  "dense"  gguf's values stored as float16 (16 bpw, each weight rounded once);
  bits     re-quantized to a `bits`-bit affine form (`requantize`, lossy).

The CPU path that expands every weight at load gets gguf's float32 values (`dense_values`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .affine import GROUP, Affine, to_affine
from .ggml import Q2_K, Q6_K, crumbs, finite_f16

# -- gguf's values, in numpy --------------------------------------------------------------------


def q2_k_values(blocks) -> np.ndarray:
    # scales: 16 bytes (low nibble sc, high nibble m) | qs: 64 bytes, 2-bit | d, dmin: f16
    # w = d·sc·q − dmin·m per 16 weights → (rows, nb, 16, 16) float32, as gguf computes it
    s = blocks[..., :16]
    dl = (finite_f16(blocks, 80)[..., None].astype(np.float32) * (s & 15))[..., None]
    ml = (finite_f16(blocks, 82)[..., None].astype(np.float32) * (s >> 4))[..., None]
    q = crumbs(blocks[..., 16:80]).reshape(*blocks.shape[:-1], 16, 16)
    return dl * q - ml


def q6_k_values(blocks) -> np.ndarray:
    # ql: 128 bytes, low 4 bits | qh: 64 bytes, high 2 bits | scales: 16 int8 | d: f16
    # w = d·sc·(q − 32) per 16 weights → (rows, nb, 16, 16) float32, exact (≤ 24 significant bits)
    ql = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 1, 64)  # 2 halves of 128 weights
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)
    q = (ql | (crumbs(blocks[..., 128:192]) << 4)).view(np.int8) - np.int8(32)
    dl = (finite_f16(blocks, 208)[..., None].astype(np.float32) * blocks[..., 192:208].view(np.int8))[..., None]
    return dl * q.reshape(*q.shape[:-1], 16, 16)


_VALUES = {Q2_K: q2_k_values, Q6_K: q6_k_values}
SUBBLOCK16 = tuple(_VALUES)


def dense_values(ggml_type: int, blocks: np.ndarray, dtype: mx.Dtype = mx.float32) -> mx.array:
    """gguf's float32 values of Q2_K/Q6_K blocks (rows, nb, type_size) → (rows, nb·256), cast to
    `dtype` and computed now, so that only one chunk of rows is ever held in float32."""
    w = mx.array(_VALUES[ggml_type](blocks).reshape(blocks.shape[0], -1)).astype(dtype)
    mx.eval(w)
    return w


def requantize(w: np.ndarray, bits: int) -> Affine:
    """Lossy: float weights (rows, ..., n) → `bits`-bit affine, group 32, round to nearest.

    Per group: bias = min and scale = (max − min) / (2**bits − 1) in float16, the scale rounded
    up so that the grid still reaches max; then |Δw| ≤ scale / 2 + |min − bias| (half a step,
    plus the float16 rounding of the group's minimum).
    """
    rows = w.shape[0]
    g = w.reshape(rows, -1, GROUP).astype(np.float32, copy=False)  # (rows, groups, 32)
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
    return to_affine(q, scale, bias, bits)


def requantized(ggml_type: int, blocks: np.ndarray, bits: int) -> Affine:
    """Q2_K/Q6_K blocks (rows, nb, type_size) re-quantized to `bits`-bit affine (lossy)."""
    return requantize(_VALUES[ggml_type](blocks), bits)


# -- the file's blocks, dequantized by MLX ops --------------------------------------------------


@dataclass
class Blocks:
    """A Q2_K/Q6_K tensor kept as the file's blocks, split into fields of shape (rows, n_blocks, …):
    Q6_K: qs (192 bytes: 4 low bits, then 2 high bits), scales (16 int8), d (float16);
    Q2_K: scales (16 bytes: sc low nibble, m high), qs (64 bytes, 2-bit), d, dmin (float16)."""

    ggml_type: int
    fields: dict[str, mx.array]

    def dequantize(self, dtype=mx.float32) -> mx.array:
        return dequantize_blocks(self.ggml_type, self.fields, dtype)


def split_blocks(ggml_type: int, blocks: np.ndarray) -> Blocks:
    """Q2_K/Q6_K blocks (rows, nb, type_size) → their fields (the form the CUDA kernels take too)."""
    f16_field = lambda at: mx.array(finite_f16(blocks, at))  # noqa: E731
    if ggml_type == Q6_K:
        fields = {"qs": mx.array(blocks[..., :192]), "scales": mx.array(blocks[..., 192:208].view(np.int8)), "d": f16_field(208)}
    else:
        fields = {"scales": mx.array(blocks[..., :16]), "qs": mx.array(blocks[..., 16:80]), "d": f16_field(80), "dmin": f16_field(82)}
    return Blocks(ggml_type, fields)


_MX_SHIFT2 = mx.array([0, 2, 4, 6], dtype=mx.uint8)[:, None]


def _mx_crumbs(qs: mx.array) -> mx.array:
    """`ggml.crumbs` in MLX: (..., 32·c) uint8 → (..., 128·c)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, 32)  # (..., c, 1, 32)
    return ((qs >> _MX_SHIFT2) & 3).reshape(*qs.shape[:-3], -1)


def _q6_k_mx(qs, scales, d):
    lead = d.shape  # (..., nb)
    ql = qs[..., :128].reshape(*lead, 2, 1, 64)  # 2 halves of 128 weights
    ql = mx.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*lead, 256)
    q = (ql | (_mx_crumbs(qs[..., 128:]) << 4)).astype(mx.int8) - 32
    dl = (d[..., None].astype(mx.float32) * scales.astype(mx.float32))[..., None]  # (..., nb, 16, 1)
    return (dl * q.reshape(*lead, 16, 16)).reshape(*lead[:-1], -1)


def _q2_k_mx(scales, qs, d, dmin):
    lead = d.shape  # (..., nb)
    dl = (d[..., None].astype(mx.float32) * (scales & 15))[..., None]  # (..., nb, 16, 1)
    ml = (dmin[..., None].astype(mx.float32) * (scales >> 4))[..., None]
    q = _mx_crumbs(qs).reshape(*lead, 16, 16)
    return (dl * q - ml).reshape(*lead[:-1], -1)


_MX_VALUES = {Q6_K: _q6_k_mx, Q2_K: _q2_k_mx}
_compiled: dict = {}


def dequantize_blocks(ggml_type: int, fields, dtype: mx.Dtype = mx.float32) -> mx.array:
    """gguf's float32 values of `Blocks` fields (any leading shape, e.g. rows picked by an
    embedding lookup), cast to `dtype`: (..., n_blocks, …) → (..., n_blocks · 256). Elementwise
    work that `mx.compile` fuses into one pass over the blocks, writing only the `dtype` result."""
    fn = _compiled.get((ggml_type, dtype))
    if fn is None:
        values = _MX_VALUES[ggml_type]
        fn = _compiled[ggml_type, dtype] = mx.compile(lambda **f: values(**f).astype(dtype))
    return fn(**fields)
