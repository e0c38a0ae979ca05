"""Each GGUF type's MLX form against `gguf.quants.dequantize` of the same blocks.

Blocks come from `gguf.quants.quantize` where gguf can quantize the type, from real llama.cpp
files (`tests/golden/quant_fixtures.npz`, made by `scripts/make_quant_fixtures.py`) and from
random valid blocks built here (random bytes with sane float16 scales, plus edge cases).
The tolerance of each type is stated and justified in `check_against_gguf`.
"""

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlx_llama import quants
from mlx_llama.gguf_file import GGUFError, TensorInfo
from mlx_llama.quants import FORMATS, Affine, Blocks, decode_tensor, formats
from mlx_llama.quants.affine import pack

T = gguf.GGMLQuantizationType
FIXTURES = Path(__file__).parent / "golden" / "quant_fixtures.npz"

GGUF_QUANTIZES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
LLAMA_CPP_ONLY = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
QUANTIZED = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0] + LLAMA_CPP_ONLY
AFFINE = [t for t in QUANTIZED if t not in (T.Q2_K, T.Q6_K)]  # Q2_K, Q6_K: the file's blocks unless told otherwise

# Where each type keeps its float16 block scales (byte offsets), for building random blocks.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0],
              T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_XS: [0]}
EXACT = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q3_K, T.IQ4_NL}  # float16 scales are gguf's


def decode(qtype, blocks: np.ndarray, shape, **kw) -> mx.array | Affine | Blocks:
    return decode_tensor("t.gguf", TensorInfo("w", int(qtype), tuple(shape), blocks), **kw)


def as_numpy(decoded) -> np.ndarray:
    """The float32 values of a decoded form: `dequantize()` (Affine, Blocks) or the dense weight."""
    w = decoded.astype(mx.float32) if isinstance(decoded, mx.array) else decoded.dequantize()
    return np.array(w)


def quantized_form(decoded: Affine) -> np.ndarray:
    """What the kept-quantized model multiplies by: packed q with the float16 scales and biases."""
    s, b = decoded.scales.astype(mx.float32), decoded.biases.astype(mx.float32)
    return np.array(mx.dequantize(decoded.weight, s, b, group_size=decoded.group_size, bits=decoded.bits))


def random_blocks(qtype, rows: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Valid blocks: every byte random, except the float16 scales, which get random signs and
    magnitudes from 1e-8 (float16 subnormals) to 10."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        d = rng.standard_normal((rows, n_blocks)) * 10.0 ** rng.uniform(-8, 1, (rows, n_blocks))
        b[..., at : at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(rows, -1)


def check_against_gguf(qtype, blocks: np.ndarray, shape):
    """The MLX forms' float32 values against gguf's, within the type's stated tolerance."""
    rows = shape[0]
    decoded = decode(qtype, blocks, shape)
    ref = gguf.quants.dequantize(blocks, qtype).reshape(shape)
    ours = as_numpy(decoded).reshape(shape)
    if qtype in (T.Q2_K, T.Q6_K):
        # Kept as the file's blocks: `dequantize_blocks` computes gguf's float32 values with the
        # same float32 operations in the same order (d·sc exact, then one rounding per product
        # and, for Q2_K, one for the subtraction), so they are equal bit for bit.
        assert isinstance(decoded, Blocks)
        assert sum(v.nbytes for v in decoded.fields.values()) == blocks.nbytes  # the file's size
        np.testing.assert_array_equal(ours, ref)
        # rows picked from the blocks (an embedding lookup) give the same rows
        pick = mx.array([rows - 1, 0])
        picked = quants.dequantize_blocks(int(qtype), {k: v[pick] for k, v in decoded.fields.items()})
        np.testing.assert_array_equal(np.array(picked), ref[[rows - 1, 0]])
        # expanded at load (the CPU path): gguf's float32 values, dense
        expanded = decode(qtype, blocks, shape, dense_dtype=mx.float32, expand=True)
        assert isinstance(expanded, mx.array)
        np.testing.assert_array_equal(as_numpy(expanded).reshape(shape), ref)
        return decoded
    # Every other type: 0. Dense types are copied; for affine ones, float16 scale × (≤ 8-bit q) is
    # exact in float32, and where gguf rounds (d·q + m in Q4_1/Q5_1/Q4_K/Q5_K) the same single
    # float32 addition rounds the same way. Where MLX's float16 scales would round gguf's
    # (Q4_K, Q5_K, IQ4_XS), `dequantize` uses the float32 ones the decoder keeps in `exact`.
    np.testing.assert_array_equal(ours, ref)
    if isinstance(decoded, mx.array):
        return decoded
    kept = quantized_form(decoded).reshape(shape)
    if qtype in EXACT:
        # the float16 scales are gguf's own: the kept-quantized form is exact too
        assert decoded.exact is None
        np.testing.assert_array_equal(kept, ref)
    elif qtype in (T.Q4_K, T.Q5_K):
        # The kept form's scale is d·sc (float16 × 6-bit integer, up to 17 significant bits)
        # rounded to the nearest float16, its bias −dmin·m likewise (both checked to be exactly
        # that, against gguf's own unpacking of the scales). So |Δw| = |Δscale·q + Δbias|
        # ≤ 2⁻¹¹·(|d·sc|·qmax + |dmin·m|), plus one float32 rounding of w on either side (2⁻²³·|w|).
        b = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        d, dmin = b[:, 0:2].view(np.float16).astype(np.float32), b[:, 2:4].view(np.float16).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        scale, bias = (d * sc).reshape(rows, -1), (-dmin * m).reshape(rows, -1)  # per 32 weights, exact
        np.testing.assert_array_equal(np.array(decoded.scales), scale.astype(np.float16))
        np.testing.assert_array_equal(np.array(decoded.biases), bias.astype(np.float16))
        bound = 2.0**-11 * (np.abs(scale) * (2**decoded.bits - 1) + np.abs(bias))
        err = np.abs(kept - ref).reshape(rows, -1, 32)
        assert (err <= bound[..., None] + 2.0**-23 * np.abs(ref).reshape(err.shape)).all()
    elif qtype == T.IQ4_XS:
        # The kept scale d·(ls − 32) is rounded to float16 (≤ 2⁻¹¹ relative; exact when subnormal)
        # and w = scale·level with no zero point, so every weight is off by ≤ 2⁻¹¹ of itself.
        assert (np.abs(kept - ref) <= 2.0**-11 * np.abs(ref)).all()
    else:
        raise AssertionError(f"no tolerance stated for {qtype.name}")
    return decoded


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES, ids=lambda t: t.name)
def test_gguf_quantized_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    # wide dynamic range per row, so scales and zero points vary a lot
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 30, (16, 1))).astype(np.float32)
    decoded = check_against_gguf(qtype, gguf.quants.quantize(x, qtype), x.shape)
    assert isinstance(decoded, mx.array if FORMATS[int(qtype)].block_size == 1 else Affine)


@pytest.mark.parametrize("qtype", LLAMA_CPP_ONLY + [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_llama_cpp_blocks(qtype):
    """Blocks of a real llama.cpp-quantized SmolLM2 tensor (16 rows × 512 weights)."""
    blocks = np.load(FIXTURES)[qtype.name]
    check_against_gguf(qtype, blocks, (blocks.shape[0], 512))


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_random_blocks(qtype):
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, 24, 1024 // block_size, seed=int(qtype))
    check_against_gguf(qtype, blocks, (24, 1024))


def test_q3_k_grid_edges():
    """Q3_K's integer k = (sc − 32)·q spans [−124, 128] — one more than int8 at the top."""
    b = np.zeros((2, 110), np.uint8)  # hmask 0 and qs 0 → q = −4 everywhere
    b[0, 96:108] = 0x00  # sc − 32 = −32 → k = 128
    b[1, 96:108] = 0xFF  # sc − 32 = 31 → k = −124
    b[:, 108:110] = np.array([0.5], np.float16).view(np.uint8)
    decoded = check_against_gguf(T.Q3_K, b, (2, 256))
    np.testing.assert_array_equal(as_numpy(decoded), [[64.0] * 256, [-62.0] * 256])


def assert_quantized_matmul_matches(d: Affine):
    x = mx.array(np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32))
    y = mx.quantized_matmul(x, d.weight, d.scales, d.biases, transpose=True, group_size=d.group_size, bits=d.bits)
    w = quantized_form(d)
    # float32 sums of 512 products, accumulated in different orders: ≤ ~512 ε of Σ|x·w|
    bound = 1e-4 * (np.abs(np.array(x)) @ np.abs(w).T)
    assert (np.abs(np.array(y) - np.array(x) @ w.T) <= bound).all()


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda t: t.name)
def test_quantized_matmul_matches_dequantized(qtype):
    """MLX's quantized kernel reads the packed layout as `dequantize` does."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    assert_quantized_matmul_matches(decode(qtype, random_blocks(qtype, 64, 512 // block_size, seed=1), (64, 512)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_layout(bits):
    """`_pack` writes what `mx.quantize` writes, for every width MLX has."""
    w = mx.array(np.random.default_rng(bits).standard_normal((8, 256)).astype(np.float32))
    wq, _, _ = mx.quantize(w, group_size=32, bits=bits)
    unit = mx.ones((8, 8))
    q = np.array(mx.dequantize(wq, unit, mx.zeros((8, 8)), group_size=32, bits=bits)).astype(np.uint8)
    np.testing.assert_array_equal(pack(q, bits), np.array(wq))


@pytest.mark.parametrize("bits", [8, 6, 3])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q6_K], ids=lambda t: t.name)
def test_lossy_subblock16(qtype, bits):
    """The opt-in smaller affine form of Q2_K/Q6_K: re-quantized, error within the stated bound."""
    blocks = random_blocks(qtype, 16, 2, seed=bits)
    ref = gguf.quants.dequantize(blocks, qtype).reshape(16, 512)
    try:
        quants.set_subblock16_form(bits)
        fmt = FORMATS[int(qtype)]
        assert f"{bits}-bit" in fmt.representation and "lossy" in fmt.representation
        assert fmt.bits_per_weight == bits + 1
        d = decode(qtype, blocks, ref.shape)
    finally:
        quants.set_subblock16_form()
    assert isinstance(d, Affine) and d.bits == bits
    s, b = np.array(d.scales).astype(np.float32), np.array(d.biases).astype(np.float32)
    groups = ref.reshape(16, -1, 32)
    # half a step (float32 slack for the rounding of (w − bias) / scale), plus the float16 rounding
    # of the group's minimum, which the bias stores
    bound = s / 2 * (1 + 2.0**-12) + np.abs(groups.min(axis=-1) - b)
    err = np.abs(as_numpy(d).reshape(groups.shape) - groups)
    assert (err <= bound[..., None]).all()
    assert_quantized_matmul_matches(d)  # the 6-bit stream too
    assert isinstance(decode(qtype, blocks, ref.shape), Blocks)  # switched back
    with pytest.raises(ValueError):
        quants.set_subblock16_form(7)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q6_K], ids=lambda t: t.name)
def test_dense_subblock16(qtype):
    """The opt-in dense form: each weight gguf's float32 value rounded once to float16."""
    blocks = random_blocks(qtype, 8, 2, seed=1)
    ref = gguf.quants.dequantize(blocks, qtype).reshape(8, 512)
    try:
        quants.set_subblock16_form("dense")
        d = decode(qtype, blocks, ref.shape)
        assert FORMATS[int(qtype)].bits_per_weight == 16
    finally:
        quants.set_subblock16_form()
    assert isinstance(d, mx.array) and d.dtype == mx.float16
    np.testing.assert_array_equal(as_numpy(d), ref.astype(np.float16).astype(np.float32))


def test_table_matches_gguf_and_bits_per_weight():
    for ggml_type, fmt in FORMATS.items():
        qtype = T(ggml_type)
        assert fmt.name == qtype.name
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
        # bits_per_weight is what the decoded arrays really take
        blocks = random_blocks(qtype, 4, 512 // fmt.block_size) if qtype in F16_FIELDS else np.zeros((4, 512 * fmt.type_size), np.uint8)
        d = decode(qtype, blocks, (4, 512))
        arrays = [d] if isinstance(d, mx.array) else list(d.fields.values()) if isinstance(d, Blocks) else [d.weight, d.scales, d.biases]
        assert sum(a.nbytes for a in arrays) * 8 / (4 * 512) == fmt.bits_per_weight, qtype.name
    # the exact native-size affine forms stay within 1.15× the file's bytes
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K):
        fmt = FORMATS[int(qtype)]
        assert fmt.bits_per_weight <= 1.15 * fmt.file_bits_per_weight, qtype.name


def test_chunked_decoding_is_seamless(monkeypatch):
    """Big tensors are decoded a few rows at a time; the pieces join into the same arrays."""
    for qtype in (T.Q4_K, T.Q6_K, T.Q5_0):
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        blocks = random_blocks(qtype, 37, 768 // block_size)
        whole = decode(qtype, blocks, (37, 768))
        monkeypatch.setattr(formats, "CHUNK_WEIGHTS", 3 * 768)  # 3 rows at a time, 13 pieces
        pieces = decode(qtype, blocks, (37, 768))
        monkeypatch.undo()
        if isinstance(whole, Blocks):
            for k, v in whole.fields.items():
                np.testing.assert_array_equal(np.array(pieces.fields[k]), np.array(v))
        for field in ("weight", "scales", "biases") if isinstance(whole, Affine) else ():
            np.testing.assert_array_equal(np.array(getattr(pieces, field)), np.array(getattr(whole, field)))
        np.testing.assert_array_equal(as_numpy(pieces), as_numpy(whole))  # Q4_K's exact scales too


def test_memory_mapped_tensor_pages_are_released_not_lost(tmp_path):
    """Decoding hands a read-only mapping's pages back to the OS; reading again re-reads the file.
    Arrays in ordinary memory are never touched (releasing those would zero them)."""
    blocks = random_blocks(T.Q4_K, 64, 8)
    path = tmp_path / "blocks.bin"
    blocks.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").reshape(blocks.shape)
    first = as_numpy(decode(T.Q4_K, mapped, (64, 2048)))
    np.testing.assert_array_equal(mapped, blocks)
    np.testing.assert_array_equal(as_numpy(decode(T.Q4_K, mapped, (64, 2048))), first)
    copy = blocks.copy()
    decode(T.Q4_K, blocks, (64, 2048))
    np.testing.assert_array_equal(blocks, copy)


def test_vector_decodes_to_1d():
    v = np.arange(64, dtype=np.float32)
    d = decode_tensor("t.gguf", TensorInfo("n", int(T.F32), (64,), v))
    assert d.shape == (64,)


def test_wrong_size_and_type_are_one_line_errors():
    blocks = gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q4_1)
    with pytest.raises(GGUFError, match="bytes, but Q4_1"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q4_1), (4, 96), blocks))
    with pytest.raises(GGUFError, match="not a multiple of Q8_0's block size"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q8_0), (4, 48), np.zeros((4, 51), np.uint8)))
    with pytest.raises(GGUFError, match="unsupported type IQ2_XXS"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.IQ2_XXS), (1, 256), np.zeros((1, 66), np.uint8)))


@pytest.mark.parametrize("qtype", LLAMA_CPP_ONLY + [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_malformed_sizes_are_one_line_errors(qtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    good = random_blocks(qtype, 2, 2)
    with pytest.raises(GGUFError, match=f"bytes, but {qtype.name}") as e:
        decode_tensor("bad.gguf", TensorInfo("w", int(qtype), (2, 2 * block_size), good[:, :-1]))
    assert "\n" not in str(e.value)
    with pytest.raises(GGUFError, match=f"not a multiple of {qtype.name}'s block size {block_size}"):
        decode_tensor("bad.gguf", TensorInfo("w", int(qtype), (2, block_size + 16), good))


def test_scales_beyond_float16_are_an_error():
    """Q3_K's zero point is 128·d: a block scale d > 511.9 has no float16 bias (no real model has one)."""
    b = np.zeros((1, 110), np.uint8)
    b[0, 108:110] = np.array([1000.0], np.float16).view(np.uint8)
    with pytest.raises(GGUFError, match="tensor 'w': block scale outside the float16 range"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q3_K), (1, 256), b))
