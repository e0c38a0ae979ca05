"""Each GGUF type's MLX form dequantizes to exactly what `gguf.quants.dequantize` gives."""

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.gguf_file import GGUFError, TensorInfo
from mlx_llama.quants import FORMATS, Affine, Dense, decode_tensor

T = gguf.GGMLQuantizationType


def as_numpy(decoded) -> np.ndarray:
    w = decoded.dequantize() if isinstance(decoded, Affine) else decoded.weight.astype(mx.float32)
    return np.array(w)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0])
def test_decoder_is_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    # wide dynamic range per row, so scales and zero points vary a lot
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 30, (16, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(x, qtype)
    decoded = decode_tensor("t.gguf", TensorInfo("w", int(qtype), x.shape, blocks))
    reference = gguf.quants.dequantize(blocks, qtype).reshape(x.shape)
    # Exact: the float16 block scales map unchanged onto MLX's scales, and the product is float32.
    np.testing.assert_array_equal(as_numpy(decoded), reference)
    expected_kind = Dense if FORMATS[int(qtype)].block_size == 1 else Affine
    assert isinstance(decoded, expected_kind)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_quantized_matmul_matches_dequantized(qtype):
    """MLX's quantized kernel reads the packed layout the way `dequantize` does."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    d = decode_tensor("t.gguf", TensorInfo("w", int(qtype), w.shape, gguf.quants.quantize(w, qtype)))
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    y = mx.quantized_matmul(x, d.weight, d.scales, d.biases, transpose=True, group_size=d.group_size, bits=d.bits)
    np.testing.assert_allclose(np.array(y), np.array(x) @ as_numpy(d).T, rtol=1e-4, atol=1e-4)


def test_vector_decodes_to_1d():
    v = np.arange(64, dtype=np.float32)
    d = decode_tensor("t.gguf", TensorInfo("n", int(T.F32), (64,), v))
    assert d.weight.shape == (64,)


def test_wrong_size_and_type_are_one_line_errors():
    blocks = gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q4_1)
    with pytest.raises(GGUFError, match="bytes, but Q4_1"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q4_1), (4, 96), blocks))
    with pytest.raises(GGUFError, match="not a multiple of Q8_0's block size"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q8_0), (4, 48), np.zeros((4, 51), np.uint8)))
    with pytest.raises(GGUFError, match="unsupported type Q2_K"):
        decode_tensor("bad.gguf", TensorInfo("w", int(T.Q2_K), (1, 256), np.zeros((1, 84), np.uint8)))
