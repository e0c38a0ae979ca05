"""GGUF tensor blocks → MLX arrays.

One table, `FORMATS`, says for each GGUF type how its blocks are laid out and how they become
MLX arrays. A type either becomes a dense array (F32, F16, BF16) or stays quantized in MLX's
affine format, `w = scale * q + bias` per group of `group_size` weights with `bits`-bit unsigned
`q` packed little-end-first into uint32 words. The mapping is exact: GGUF's float16 block
scales are stored unchanged (times a power of two for the zero point), so `mx.dequantize`
gives the same numbers as `gguf.quants.dequantize`.

Adding a type is adding a decoder and a row to `FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .gguf_file import GGUFError, TensorInfo

# GGML type ids (gguf.GGMLQuantizationType), spelled out so the table reads on its own.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


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

    def dequantize(self, dtype=mx.float32) -> mx.array:
        # The float16 scales are exact; computing in float32 keeps the result exact too.
        s, b = self.scales.astype(dtype), self.biases.astype(dtype)
        return mx.dequantize(self.weight, s, b, group_size=self.group_size, bits=self.bits)


@dataclass(frozen=True)
class Format:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    decode: Callable[[np.ndarray], Dense | Affine]  # (rows, n_blocks, type_size) uint8 → MLX arrays
    representation: str  # what it becomes in MLX, for `info`


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) uint8 values < 2**bits → (rows, n * bits / 32) uint32, first value in the low bits."""
    rows, n = q.shape
    if bits == 8:
        return np.ascontiguousarray(q).view("<u4")
    if bits == 4:
        q = q.reshape(rows, n // 2, 2)
        return np.ascontiguousarray(q[..., 0] | (q[..., 1] << 4)).view("<u4")
    raise ValueError(f"no packing for {bits} bits")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block: (rows, n_blocks)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view("<f2")[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 byte j holds weight j in its low and weight j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, n_blocks, 32)


def _affine(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> Affine:
    rows = q.shape[0]
    return Affine(
        weight=mx.array(_pack(q.reshape(rows, -1), bits)),
        scales=mx.array(scales.astype(np.float16)),
        biases=mx.array(biases.astype(np.float16)),
        bits=bits,
        group_size=q.shape[-1],
    )


def decode_q4_0(blocks):  # d: f16, qs: 16 bytes; w = d * (q - 8)
    d = _f16(blocks, 0)
    return _affine(_nibbles(blocks[..., 2:]), d, d * np.float16(-8), bits=4)


def decode_q4_1(blocks):  # d, m: f16, qs: 16 bytes; w = d * q + m
    return _affine(_nibbles(blocks[..., 4:]), _f16(blocks, 0), _f16(blocks, 2), bits=4)


def decode_q8_0(blocks):  # d: f16, qs: 32 int8; w = d * q = d * (q + 128) - 128 d
    d = _f16(blocks, 0)
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _affine(q, d, d * np.float16(-128), bits=8)


def _dense(dtype: str) -> Callable[[np.ndarray], Dense]:
    def decode(blocks):
        rows = blocks.shape[0]
        a = np.ascontiguousarray(blocks).reshape(rows, -1).view(dtype)
        if dtype == "<u2":  # bfloat16: numpy has no such type; MLX does
            return Dense(mx.array(a).view(mx.bfloat16))
        return Dense(mx.array(a))

    return decode


FORMATS: dict[int, Format] = {
    F32: Format("F32", 1, 4, _dense("<f4"), "dense float32"),
    F16: Format("F16", 1, 2, _dense("<f2"), "dense float16"),
    BF16: Format("BF16", 1, 2, _dense("<u2"), "dense bfloat16"),
    Q4_0: Format("Q4_0", 32, 18, decode_q4_0, "affine 4-bit, group 32 (exact)"),
    Q4_1: Format("Q4_1", 32, 20, decode_q4_1, "affine 4-bit, group 32 (exact)"),
    Q8_0: Format("Q8_0", 32, 34, decode_q8_0, "affine 8-bit, group 32 (exact)"),
}


def type_name(ggml_type: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def decode_tensor(path: str, t: TensorInfo) -> Dense | Affine:
    """Turn one memory-mapped GGUF tensor into MLX arrays, checking its size against its type."""
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
    out = fmt.decode(blocks)
    if len(t.shape) == 1:  # vectors (norm weights) are stored as one row
        out.weight = out.weight.reshape(-1)
    return out
