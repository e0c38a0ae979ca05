"""The table `FORMATS` (GGUF type → MLX form) and `decode_tensor`: one memory-mapped GGUF tensor
→ the arrays the model holds."""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import GGUFError
from ..gguf_file import TensorInfo
from . import decoders as dec
from .affine import Affine, affine_bits_per_weight
from .ggml import BF16, F16, F32, BadValues, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, type_name
from .subblock16 import SUBBLOCK16, Blocks, dense_values, requantized, split_blocks

Weight = mx.array | Affine | Blocks  # a weight's final form: dense, MLX's affine form, or Q2_K/Q6_K blocks


@dataclass(frozen=True)
class Format:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    decode: Callable[[np.ndarray], Weight]  # (rows, n_blocks, type_size) uint8 → MLX arrays
    representation: str  # what it becomes in MLX and how exact, for `info`
    bits_per_weight: float  # MLX storage, as decoded (dense types: in the file's dtype)

    @property
    def file_bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def _subblock16_format(name: str, ggml_type: int, type_size: int, form) -> Format:
    if form == "blocks":
        return Format(name, 256, type_size, functools.partial(split_blocks, ggml_type),
                      "the file's blocks, dequantized when used (exact: gguf's values, in the compute dtype)",
                      8 * type_size / 256)
    if form == "dense":
        return Format(name, 256, type_size, lambda blocks: dense_values(ggml_type, blocks, mx.float16),
                      "dense float16 (each weight rounded once to float16)", 16)
    return Format(name, 256, type_size, lambda blocks: requantized(ggml_type, blocks, form),
                  f"affine {form}-bit, group 32, re-quantized (lossy: ≤ half a step + float16 rounding of the min)",
                  affine_bits_per_weight(form))


_EXACT = "exact"
_K_SCALE = "float16 scale d·sc and bias −dmin·m rounded; exact when dequantized"
_XS_SCALE = "float16 scale d·(ls − 32) rounded, ≤ 2⁻¹¹ relative; exact when dequantized"

FORMATS: dict[int, Format] = {
    F32: Format("F32", 1, 4, dec.dense("<f4"), "dense float32 (exact)", 32),
    F16: Format("F16", 1, 2, dec.dense("<f2"), "dense float16 (exact)", 16),
    BF16: Format("BF16", 1, 2, dec.dense("<u2"), "dense bfloat16 (exact)", 16),
    Q4_0: Format("Q4_0", 32, 18, dec.decode_q4_0, f"affine 4-bit, group 32 ({_EXACT})", affine_bits_per_weight(4)),
    Q4_1: Format("Q4_1", 32, 20, dec.decode_q4_1, f"affine 4-bit, group 32 ({_EXACT})", affine_bits_per_weight(4)),
    Q5_0: Format("Q5_0", 32, 22, dec.decode_q5_0, f"affine 5-bit, group 32 ({_EXACT})", affine_bits_per_weight(5)),
    Q5_1: Format("Q5_1", 32, 24, dec.decode_q5_1, f"affine 5-bit, group 32 ({_EXACT})", affine_bits_per_weight(5)),
    Q8_0: Format("Q8_0", 32, 34, dec.decode_q8_0, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    IQ4_NL: Format("IQ4_NL", 32, 18, dec.decode_iq4_nl, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    Q2_K: _subblock16_format("Q2_K", Q2_K, 84, "blocks"),
    Q3_K: Format("Q3_K", 256, 110, dec.decode_q3_k, f"affine 8-bit, group 32 ({_EXACT})", affine_bits_per_weight(8)),
    Q4_K: Format("Q4_K", 256, 144, dec.decode_q4_k, f"affine 4-bit, group 32 ({_K_SCALE})", affine_bits_per_weight(4)),
    Q5_K: Format("Q5_K", 256, 176, dec.decode_q5_k, f"affine 5-bit, group 32 ({_K_SCALE})", affine_bits_per_weight(5)),
    Q6_K: _subblock16_format("Q6_K", Q6_K, 210, "blocks"),
    IQ4_XS: Format("IQ4_XS", 256, 136, dec.decode_iq4_xs, f"affine 8-bit, group 32 ({_XS_SCALE})", affine_bits_per_weight(8)),
}


def set_subblock16_form(form: str | int | None = None) -> None:
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
    by ~2.8 (dense float16: 0.02). None: by device (`subblock16_form`). Affects tensors decoded
    afterwards (call before `load`).
    """
    if form is not None and form not in ("blocks", "dense", 2, 3, 4, 5, 6, 8):
        raise ValueError(f"Q2_K/Q6_K form must be 'blocks', 'dense' or 2, 3, 4, 5, 6, 8 bits (MLX's affine widths), not {form!r}")
    global _chosen_form
    _chosen_form = form
    for ggml_type in SUBBLOCK16:  # the table shows the chosen form (the blocks when it goes by device)
        FORMATS[ggml_type] = _subblock16_format(FORMATS[ggml_type].name, ggml_type, FORMATS[ggml_type].type_size,
                                                "blocks" if form is None else form)


_chosen_form: str | int | None = None  # set by `set_subblock16_form`; None: by device


def subblock16_form() -> str | int:
    """The form Q2_K/Q6_K tensors take when kept compact: the one set by `set_subblock16_form`,
    else by device: the file's blocks on the CPU and on NVIDIA GPUs (CUDA kernels read them), dense
    float16 on other GPUs (Metal), where every use would dequantize the whole matrix with MLX ops
    and MLX's own float16 matmul is the fast path."""
    if _chosen_form is not None:
        return _chosen_form
    if mx.default_device() == mx.gpu and not mx.cuda.is_available():
        return "dense"
    return "blocks"


# -- decoding one tensor ------------------------------------------------------------------------

# Decode at most this many weights at a time: the numpy temporaries (a few bytes per weight) then
# stay ~10-100 MB whatever the tensor's size; the pieces are joined by `mx.concatenate`.
CHUNK_WEIGHTS = 1 << 22


def decode_tensor(path: str, t: TensorInfo, dense_dtype: mx.Dtype | None = None, expand: bool = False) -> Weight:
    """One memory-mapped GGUF tensor in its final form, its size checked against its type: a
    dense array, an `Affine` or `Blocks`, which the model holds as they are.

    Without `expand`, each type takes its `FORMATS` form. With `expand` (the CPU path), every type
    comes out dense with gguf's values: affine types dequantized exactly, Q2_K/Q6_K computed from
    their blocks. Dense results are in `dense_dtype` (None: the file's dtype, float32 for expanded
    ones), except the Q2_K/Q6_K "dense" form: float16, as its row says (a stored form, like an
    `Affine`'s float16 scales).
    """
    fmt = _format_of(path, t)
    blocks = _blocks(path, t, fmt)
    expanded_dtype = mx.float32 if dense_dtype is None else dense_dtype
    decode = fmt.decode
    if expand and t.ggml_type in SUBBLOCK16:
        decode = functools.partial(dense_values, t.ggml_type, dtype=expanded_dtype)
    # Dense types are a straight copy (no temporaries): one piece. Quantized ones go in row chunks.
    step = blocks.shape[0] if fmt.block_size == 1 else max(1, CHUNK_WEIGHTS // t.shape[-1])
    try:
        parts = _decode_rows(blocks, decode, step)
    except BadValues as e:
        raise GGUFError(path, f"tensor {t.name!r}: {e}") from None
    out = _join(parts)  # lazy: the loader's mx.eval joins the pieces (briefly 2× this tensor's MLX size)
    if expand and isinstance(out, Affine):
        out = out.dequantize(expanded_dtype)
    elif fmt.block_size == 1 and dense_dtype is not None:
        out = out.astype(dense_dtype)
    if len(t.shape) == 1 and isinstance(out, mx.array):  # vectors (norm weights) are stored as one row
        out = out.reshape(-1)
    return out


def format_for(ggml_type: int) -> Format | None:
    """The form a type takes now (Q2_K/Q6_K: by `subblock16_form`), None when unsupported."""
    if ggml_type in SUBBLOCK16:
        return _subblock16_format(FORMATS[ggml_type].name, ggml_type, FORMATS[ggml_type].type_size, subblock16_form())
    return FORMATS.get(ggml_type)


def _format_of(path: str, t: TensorInfo) -> Format:
    fmt = format_for(t.ggml_type)
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise GGUFError(path, f"tensor {t.name!r} has unsupported type {type_name(t.ggml_type)} (supported: {supported})")
    return fmt


def _blocks(path: str, t: TensorInfo, fmt: Format) -> np.ndarray:
    """The tensor's bytes as blocks (rows, n_blocks, type_size) uint8, their count checked."""
    cols = t.shape[-1]
    rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
    if cols % fmt.block_size:
        raise GGUFError(path, f"tensor {t.name!r}: row length {cols} is not a multiple of {fmt.name}'s block size {fmt.block_size}")
    raw = np.asarray(t.data).view(np.uint8).reshape(-1)
    expected = rows * (cols // fmt.block_size) * fmt.type_size
    if raw.size != expected:
        raise GGUFError(path, f"tensor {t.name!r}: {raw.size} bytes, but {fmt.name} {t.shape} needs {expected}")
    return raw.reshape(rows, cols // fmt.block_size, fmt.type_size)


def _decode_rows(blocks: np.ndarray, decode, step: int) -> list[Weight]:
    """`decode` over `step` rows of blocks at a time, each chunk's file pages released once decoded."""
    pages = _FilePages(blocks)
    parts = []
    # a scale overflowing float16 (or NaN, inf · 0) is caught by `to_affine` or `finite_f16`
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(0, blocks.shape[0], step):
            chunk = blocks[r : r + step]
            parts.append(decode(chunk))
            pages.release(chunk)
    return parts


def _join(parts: list[Weight]) -> Weight:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, Blocks):
        return Blocks(first.ggml_type, {k: mx.concatenate([p.fields[k] for p in parts]) for k in first.fields})
    if isinstance(first, mx.array):
        return mx.concatenate(parts)
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
