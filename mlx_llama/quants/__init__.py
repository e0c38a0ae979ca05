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

`decode_tensor` returns a weight's final form — a dense array (in the dtype asked for), an
`Affine` or `Blocks` — so the loader only files each under its module path.

The modules, along the data path:

    ggml.py        GGML type ids and the bit fields blocks are built of
    decoders.py    numpy block decoders: dense, legacy 32-weight, K-quant and IQ4 types
    affine.py      MLX's affine form (`Affine`) and packing q into it
    subblock16.py  Q2_K/Q6_K: gguf's values, `Blocks` and `dequantize_blocks`, `requantize`
    formats.py     the table `FORMATS`, `set_subblock16_form`, `decode_tensor`

Adding a type is adding a decoder and a row to `FORMATS`. A decoder takes the blocks of some
rows, `(rows, n_blocks, type_size)` uint8, and is vectorized numpy; `decode_tensor` hands it
~4M weights at a time, so its temporaries stay small whatever the tensor's size.
"""

from .affine import GROUP, Affine, affine_bits_per_weight
from .formats import FORMATS, Format, Weight, decode_tensor, set_subblock16_form, subblock16_form
from .ggml import BF16, F16, F32, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, type_name
from .subblock16 import SUBBLOCK16, Blocks, dense_values, dequantize_blocks, requantize, split_blocks

__all__ = [
    "FORMATS", "Format", "Weight", "decode_tensor", "set_subblock16_form", "subblock16_form", "type_name",
    "Affine", "GROUP", "affine_bits_per_weight",
    "Blocks", "SUBBLOCK16", "dense_values", "dequantize_blocks", "requantize", "split_blocks",
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
]
