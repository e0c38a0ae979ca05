"""The CUDA kernels for Q2_K/Q6_K blocks (`mlx_llama.cuda_kernels`); skipped without MLX's CUDA backend.

Run on an NVIDIA GPU with MLX-CUDA: `python -m pytest tests/test_cuda_kernels.py`.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama import cuda_affine, cuda_kernels, quants
from mlx_llama.model import BlockLinear
from test_quants import random_blocks

pytestmark = pytest.mark.skipif(not cuda_kernels.available(), reason="needs MLX's CUDA backend and an NVIDIA GPU")

TYPES = [quants.Q6_K, quants.Q2_K]


def random_fields(ggml_type: int, rows: int, nb: int, seed: int = 0):
    """Valid blocks (`test_quants.random_blocks`), split into the fields the kernels take."""
    blocks = random_blocks(ggml_type, rows, nb, seed)
    return quants.split_blocks(ggml_type, blocks.reshape(rows, nb, -1)).fields


def cpu_values(ggml_type, fields) -> np.ndarray:
    with mx.stream(mx.cpu):
        return np.array(quants.dequantize_blocks(ggml_type, fields))


@pytest.mark.parametrize("ggml_type", TYPES, ids=["Q6_K", "Q2_K"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_dequantize_is_exact(ggml_type, dtype):
    """gguf's values (checked against gguf on the CPU in test_quants.py), bit for bit, then cast."""
    fields = random_fields(ggml_type, 48, 5)
    ours = np.array(cuda_kernels.dequantize(ggml_type, fields, dtype).astype(mx.float32))
    np.testing.assert_array_equal(ours, cpu_values(ggml_type, fields).astype(np.dtype(str(dtype).split(".")[-1])).astype(np.float32))


@pytest.mark.parametrize("ggml_type", TYPES, ids=["Q6_K", "Q2_K"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_matvec_matches_dense(ggml_type, rows):
    """Float32 sums over the exact weights: relative error at float32 rounding."""
    fields = random_fields(ggml_type, 39, 6, seed=rows)  # 39: a block of the Q6_K kernel's rows left partial
    x = mx.random.normal((rows, 6 * 256), key=mx.random.key(rows))
    want = np.array(x).astype(np.float64) @ cpu_values(ggml_type, fields).T.astype(np.float64)
    got = np.array(cuda_kernels.block_matvec(x, ggml_type, fields))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_block_linear_uses_both_paths():
    """BlockLinear on the GPU: matvec for up to 8 rows, dequantize + matmul beyond. The matmul is
    cuBLAS's, which by MLX's default (MLX_ENABLE_TF32=1) runs float32 products as TF32: ~1e-3."""
    import os

    tf32 = os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    fields = random_fields(quants.Q6_K, 64, 4)
    layer = BlockLinear(quants.Q6_K, fields)
    w = cpu_values(quants.Q6_K, fields).astype(np.float64)
    for shape in [(1, 1, 1024), (1, 8, 1024), (2, 40, 1024)]:
        x = mx.random.normal(shape, key=mx.random.key(shape[1]))
        got = np.array(layer(x))
        want = np.array(x).astype(np.float64) @ w.T
        assert got.shape == (*shape[:-1], 64)
        tol = 3e-3 if tf32 and shape[1] > cuda_kernels.MATVEC_MAX_ROWS else 1e-5
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), shape


# -- MLX's affine form: `cuda_affine.matvec` and the layers that use it ------------------------

def affine_weights(rows: int, k: int, bits: int, seed: int):
    w = mx.random.normal((rows, k), key=mx.random.key(seed)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    dense = mx.dequantize(wq, scales, biases, group_size=32, bits=bits, dtype=mx.float32)
    return wq, scales, biases, np.array(dense).astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("nt", [1, 3, 8])
def test_affine_matvec_float32(bits, nt):
    """float32 activations: float32 sums of the exactly dequantized weights (K = 1056: a partial
    last step of the unrolled loop)."""
    from mlx_llama import cuda_affine

    wq, scales, biases, dense = affine_weights(70, 1056, bits, seed=bits * 10 + nt)  # 70: a partial block of rows
    x = mx.random.normal((nt, 1056), key=mx.random.key(nt))
    got = np.array(cuda_affine.matvec(x, wq, scales, biases, bits))
    want = np.array(x).astype(np.float64) @ dense.T
    assert got.shape == (nt, 70) and np.abs(got - want).max() <= 2e-6 * np.abs(want).max() * 1056 ** 0.5


@pytest.mark.parametrize("tile", [(1, 1, 4), (2, 4, 2), (4, 2, 1), (1, 8, 1)])
def test_affine_matvec_tiles(tile, monkeypatch):
    """Every tiling (warps, rows, unroll) gives the same sums (37 rows: a partial block of rows)."""
    from mlx_llama import cuda_affine

    for name, value in zip(("WARPS", "ROWS_PER_BLOCK", "UNROLL"), tile):
        monkeypatch.setattr(cuda_affine, name, value)
    wq, scales, biases, dense = affine_weights(37, 2048, 4, seed=5)
    x = mx.random.normal((2, 2048), key=mx.random.key(9))
    got = np.array(cuda_affine.matvec(x, wq, scales, biases, 4))
    want = np.array(x).astype(np.float64) @ dense.T
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max() * 2048 ** 0.5


@pytest.mark.parametrize("tile", [(1, 1), (4, 4), (2, 8)])
def test_q6_k_matvec_tiles(tile, monkeypatch):
    monkeypatch.setattr(cuda_kernels, "Q6_K_WARPS", tile[0])
    monkeypatch.setattr(cuda_kernels, "Q6_K_ROWS", tile[1])
    fields = random_fields(quants.Q6_K, 37, 9, seed=4)
    x = mx.random.normal((2, 9 * 256), key=mx.random.key(4))
    want = np.array(x).astype(np.float64) @ cpu_values(quants.Q6_K, fields).T.astype(np.float64)
    got = np.array(cuda_kernels.block_matvec(x, quants.Q6_K, fields))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_affine_matvec_half_activations(dtype):
    """Half activations are read exactly and summed in float32; only the result is rounded."""
    from mlx_llama import cuda_affine

    wq, scales, biases, dense = affine_weights(256, 4096, 4, seed=3)
    x = mx.random.normal((1, 1, 4096), key=mx.random.key(7)).astype(dtype)
    got = np.array(cuda_affine.matvec(x, wq, scales, biases, 4).astype(mx.float32))
    want = np.array(x.astype(mx.float32)).astype(np.float64).reshape(1, -1) @ dense.T
    assert got.shape == (1, 1, 256)
    rel = 2.0 ** -8 if dtype == mx.bfloat16 else 2.0 ** -11
    assert np.abs(got.reshape(1, -1) - want).max() <= 2 * rel * np.abs(want).max()


def test_affine_linear_uses_both_paths():
    """AffineLinear on the GPU: the matvec up to 8 rows, dequantize + matmul beyond; the same
    numbers as MLX's quantized matmul on the CPU (TF32 aside: MLX_ENABLE_TF32=1 by default)."""
    import os

    from mlx_llama.layers import Linear

    tf32 = os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    layer = Linear(1024, 96, bias=True)
    layer.update({"weight": mx.random.normal((96, 1024), key=mx.random.key(1)) * 0.05,
                  "bias": mx.random.normal((96,), key=mx.random.key(2))})
    layer = layer.to_quantized(group_size=32, bits=4)
    for shape in [(1, 1, 1024), (1, 8, 1024), (2, 40, 1024)]:
        x = mx.random.normal(shape, key=mx.random.key(shape[1]))
        got = np.array(layer(x))
        with mx.stream(mx.cpu):
            want = np.array(mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                                                group_size=32, bits=4) + layer.bias)
        tol = 3e-3 if tf32 and shape[1] > 8 else 1e-5
        assert got.shape == (*shape[:-1], 96) and np.abs(got - want).max() <= tol * np.abs(want).max(), shape


# -- the whole decode path -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decoding_token_by_token_equals_the_full_pass_on_the_gpu(arch, tiny_gguf):
    """The GPU decode path (affine matvec, fused projections, gemma's window)
    gives the full pass's logits, in float32 (the full pass's matmuls are cuBLAS's, TF32 by MLX's
    default: ~1e-3 of the largest logit)."""
    import os

    import mlx_llama
    from test_tokenizer import vocab_path

    path = tiny_gguf("Q8_0", arch=arch, embed_std=0.5, n_layers=3 if arch == "gemma3" else 2, vocab_from=vocab_path("llama-spm"))
    model, _ = mlx_llama.load(path, dtype=mx.float32)
    tokens = list(range(3, 3 + 20 * 7, 7))
    full = np.array(model(mx.array([tokens]))[0])
    cache = model.make_cache()
    steps = [np.array(model(mx.array([tokens[:4]]), cache)[0])] + [np.array(model(mx.array([[t]]), cache)[0]) for t in tokens[4:]]
    tol = 3e-3 if os.environ.get("MLX_ENABLE_TF32", "1") != "0" else 1e-4
    np.testing.assert_allclose(np.concatenate(steps), full, atol=tol * np.abs(full).max())


def decode_case(d, hq, hkv, cap, dtype, seed):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((1, hq, 1, d)), dtype)
    k, v = (mx.array(rng.standard_normal((1, hkv, 1, d)) * 2, dtype) for _ in range(2))
    keys, values = (mx.array(rng.standard_normal((1, hkv, cap, d)) * 2, dtype) for _ in range(2))
    return q, k, v, keys, values


ROPES = {"none": None, "traditional": (True, 1.0, None), "neox": (False, 1.0, None), "partial-scaled": (False, 0.25, 32),
         "factors": (True, 1.0, "factors")}


SHAPES = [(128, 32, 32, 0, mx.float16), (64, 9, 3, 0, mx.float32), (128, 8, 2, 5, mx.float16), (256, 4, 2, 0, mx.float16),
          (64, 6, 6, 400, mx.float32)]
ATTENTION_CASES = ([("none", *shape, position, 768) for shape in SHAPES for position in (0, 300, 767)]
                   + [(rope, *shape, position, 768) for rope in list(ROPES)[1:] for shape in SHAPES[1:3] for position in (1, 767)]
                   # a capacity split over several blocks per head (MLX_LLAMA_ATTENTION_SPLIT_FROM), then combined
                   + [("neox", *shape, position, 2000) for shape in SHAPES[1:3] + SHAPES[4:] for position in (0, 511, 1200, 1999)])


@pytest.mark.parametrize("rope, d, hq, hkv, window, dtype, position, cap", ATTENTION_CASES)
def test_decode_attention_equals_mlx_attention(rope, d, hq, hkv, window, dtype, position, cap, monkeypatch):
    """The compiled step's attention over a whole buffer (positions from `position` on hold garbage
    it must not read; the new key and value come as inputs) against MLX's RoPE, cache write and
    attention over the positions held (the last `window`). The kernel's RoPE is MLX's arithmetic
    (its frequencies computed as MLX's kernel computes them): float32 agrees to rounding."""
    from mlx_llama import cuda_attention
    from mlx_llama.model import RoPE, Vector

    from mlx_llama.cuda_attention import split_count

    monkeypatch.setenv("MLX_LLAMA_ATTENTION_SPLIT_FROM", "1024")
    assert split_count(cap) == (1 if cap < 1024 else 4)
    scale = d ** -0.5
    q, k, v, keys, values = decode_case(d, hq, hkv, cap, dtype, position + d)
    form, qr, kr = None, q, k
    if ROPES[rope] is not None:
        traditional, rope_scale, dims = ROPES[rope]
        factors = None
        if dims == "factors":
            factors, dims = Vector(d // 2), d
            factors.weight = mx.array(np.linspace(1.0, 8.0, d // 2), mx.float32)
        module = RoPE(dims or d, d, traditional, 10000.0, rope_scale, factors)
        form = module.kernel_form()
        qr, kr = module(q, position), module(k, position)
    first = max(0, position + 1 - window) if window else 0
    written = mx.concatenate([keys[:, :, :position], kr, keys[:, :, position + 1 :]], axis=2)
    written_v = mx.concatenate([values[:, :, :position], v, values[:, :, position + 1 :]], axis=2)
    ref = mx.fast.scaled_dot_product_attention(qr, written[:, :, first : position + 1], written_v[:, :, first : position + 1],
                                               scale=scale).reshape(1, 1, hq * d)  # the heads side by side
    cache = mx.concatenate([keys, values], axis=1)  # KVCache.kv: the keys' heads, then the values'
    got, kv_new = cuda_attention.decode_attention(q, k, v, cache, mx.array(position, mx.int32), scale, heads=hq,
                                                  window=window, rope=form)
    assert got.shape == ref.shape and got.dtype == dtype and kv_new.shape == (1, 2 * hkv, 1, d)
    tol = 2e-3 if dtype == mx.float16 else 1e-5
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32)), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.array(kv_new[:, :hkv].astype(mx.float32)), np.array(kr.astype(mx.float32)), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.array(kv_new[:, hkv:]), np.array(v))


def test_decode_attention_reads_the_fused_projection():
    """q, k and v as one array (the fused q/k/v output) at offsets: the same as three arrays."""
    from mlx_llama import cuda_attention
    from mlx_llama.model import RoPE

    d, hq, hkv, cap = 64, 8, 2, 512
    q, k, v, keys, values = decode_case(d, hq, hkv, cap, mx.float16, 3)
    form = RoPE(d, d, False, 10000.0, 1.0).kernel_form()
    qkv = mx.concatenate([q.reshape(1, 1, -1), k.reshape(1, 1, -1), v.reshape(1, 1, -1)], axis=-1)
    pos, cache = mx.array(200, mx.int32), mx.concatenate([keys, values], axis=1)
    want = cuda_attention.decode_attention(q, k, v, cache, pos, 0.125, heads=hq, rope=form)
    got = cuda_attention.decode_attention(qkv, qkv, qkv, cache, pos, 0.125, heads=hq, rope=form,
                                          offsets=(0, hq * d, (hq + hkv) * d))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a), np.array(b))


# -- the other fused decode kernels --------------------------------------------------------

@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (1, 3, 576), (2, 1, 2056)])
def test_add_rms_norm_equals_mlx_ops(dtype, shape):
    from mlx_llama import cuda_norm

    rng = np.random.default_rng(shape[-1])
    x, delta = (mx.array(rng.standard_normal(shape) * 3, dtype) for _ in range(2))
    w = mx.array(rng.standard_normal(shape[-1]), dtype)
    h, y = cuda_norm.add_rms_norm(x, delta, w, 1e-5)
    want_h = x + delta
    want_y = mx.fast.rms_norm(want_h, w, 1e-5)
    tol = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2, mx.float32: 1e-5}[dtype]
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == x.shape
    np.testing.assert_allclose(np.array(h.astype(mx.float32)), np.array(want_h.astype(mx.float32)), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(want_y.astype(mx.float32)), rtol=tol, atol=tol)


def add_rms_norm_by_mlx(resid: mx.array, delta: mx.array, weight: mx.array) -> tuple[mx.array, mx.array]:
    """(h, y) by MLX's ops: the add, then `mx.fast.rms_norm` (eps 1e-5)."""
    h = resid + delta
    return h, mx.fast.rms_norm(h, weight, 1e-5)


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "sym"])
@pytest.mark.parametrize("nt, rows, k", [(1, 4096, 4096), (1, 4096, 11008), (3, 576, 1536), (1, 70, 1056)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=["f16", "bf16", "f32"])
def test_matvec_add_norm_equals_the_matvec_then_add_rms_norm(symmetric, nt, rows, k, dtype):
    """The residual add and norm in the matvec's last block: h equal to MLX's add of the matvec's
    product (the same roundings), y to MLX's rms_norm up to the rounding of the sum of squares
    (summed in another order); several launches in a row (each resets the counter for the next).
    Rows of any length (70: not a whole number of 16-byte loads)."""
    from mlx_llama import cuda_affine

    rng = np.random.default_rng(rows + k)
    w = mx.array(rng.standard_normal((rows, k)) * 0.02, dtype)
    wq, scales, biases = mx.quantize(w, group_size=32, bits=4)
    if symmetric:
        biases = scales * -8
    counter = cuda_affine.new_counter()
    for i in range(3):
        x = mx.array(rng.standard_normal((nt, k)), dtype)
        resid = mx.array(rng.standard_normal((nt, rows)) * 3, dtype)
        weight = mx.array(rng.standard_normal(rows), dtype)
        h, y = cuda_affine.matvec_add_norm(x, wq, scales, biases, 4, resid, weight, 1e-5, counter, symmetric=symmetric)
        want_h, want_y = add_rms_norm_by_mlx(resid, cuda_affine.matvec(x, wq, scales, biases, 4, symmetric=symmetric), weight)
        assert h.shape == y.shape == (nt, rows) and h.dtype == y.dtype == dtype
        np.testing.assert_array_equal(np.array(h.astype(mx.float32)), np.array(want_h.astype(mx.float32)))
        tol = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2, mx.float32: 1e-5}[dtype]
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(want_y.astype(mx.float32)), rtol=tol, atol=tol)
        assert counter[0].item() == 0, i


@pytest.mark.parametrize("nt, rows, nb", [(1, 4096, 43), (3, 39, 6)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_q6_k_matvec_add_norm_equals_the_matvec_then_add_rms_norm(nt, rows, nb, dtype):
    """The same tail after the Q6_K block matvec (Q4_K_M's ffn_down in half the layers)."""
    fields = random_fields(quants.Q6_K, rows, nb, seed=rows)
    rng = np.random.default_rng(nb)
    counter = cuda_affine.new_counter()
    for i in range(3):
        x = mx.array(rng.standard_normal((nt, nb * 256)) * 0.1, dtype)
        resid = mx.array(rng.standard_normal((nt, rows)), dtype)
        weight = mx.array(rng.standard_normal(rows), dtype)
        h, y = cuda_kernels.block_matvec_add_norm(x, fields, resid, weight, 1e-5, counter)
        want_h, want_y = add_rms_norm_by_mlx(resid, cuda_kernels.block_matvec(x, quants.Q6_K, fields), weight)
        np.testing.assert_array_equal(np.array(h.astype(mx.float32)), np.array(want_h.astype(mx.float32)))
        tol = 2e-3 if dtype == mx.float16 else 1e-5
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(want_y.astype(mx.float32)), rtol=tol, atol=tol)
        assert counter[0].item() == 0, i


@pytest.mark.parametrize("arch, tensor_type", [("llama", "Q4_0"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("gemma3", "Q4_0")])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_embedding_row_kernel_equals_mlx_ops(arch, tensor_type, dtype, tiny_gguf, monkeypatch):
    """The "embed" piece: a decoded token's rows in one kernel, the same numbers as MLX's gathers
    and dequantization (gemma3: times its embedding scale)."""
    import mlx_llama
    from mlx_llama import cuda_embed
    from test_tokenizer import vocab_path

    path = tiny_gguf(tensor_type, arch=arch, embed_std=0.5, vocab_from=vocab_path("llama-spm"))  # offline, as on the GPU host
    model, _ = mlx_llama.load(path, dtype=dtype, cpu_dequantize=False)
    for tokens in (mx.array([[5]]), mx.array([[7, 300, 2]]), mx.array([[1], [9], [511]])):
        monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "embed")
        assert cuda_embed.serves(model.token_embd, tokens)
        got = model.embed(tokens)
        monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "none")
        want = model.embed(tokens)
        assert got.shape == want.shape and got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_affine_matvec_symmetric_form(bits, dtype):
    """Biases −2^(bits−1) · scale (Q4_0/Q5_0/Q8_0): the kernel that does not read them sums
    scale · Σ (q − 2^(bits−1)) · x: float32 sums of the exact weights, as the general form."""
    from mlx_llama import cuda_affine

    rng = np.random.default_rng(bits)
    rows, k = 96, 4096
    wq = mx.array(rng.integers(0, 2 ** 32, (rows, k * bits // 32), dtype=np.uint32))
    scales = mx.array(rng.uniform(0.001, 0.01, (rows, k // 32)), mx.float16)
    biases = scales * -(2 ** (bits - 1))
    assert cuda_affine.is_symmetric(scales, biases, bits) and not cuda_affine.is_symmetric(scales, biases + 1e-3, bits)
    # the exact weights, in float64 (MLX's CUDA dequantize rounds them to the scales' float16)
    q = np.unpackbits(np.array(wq).view(np.uint8), bitorder="little").reshape(rows, k, bits) @ (2 ** np.arange(bits))
    s64 = np.repeat(np.array(scales.astype(mx.float32)).astype(np.float64), 32, axis=1)
    dense = s64 * (q - 2 ** (bits - 1))
    x = mx.array(rng.standard_normal((1, k)), dtype)
    x64 = np.array(x.astype(mx.float32)).astype(np.float64)
    want = x64 @ dense.T
    general = np.array(cuda_affine.matvec(x, wq, scales, biases, bits).astype(mx.float32))
    got = np.array(cuda_affine.matvec(x, wq, scales, biases, bits, symmetric=True).astype(mx.float32))
    if dtype == mx.float32:
        # the general form sums s·Σ q·x and b·Σ x, which nearly cancel (b = −2^(bits−1)·s): its
        # float32 error scales with those sums; the symmetric form's with Σ |w·x|
        scale_general = (s64 * 2 ** bits) @ np.abs(x64).T
        # (float32's epsilon is 6e-8; K = 4096)
        assert (np.abs(general - want) <= 1e-5 * scale_general.T).all()
        assert np.abs(got - want).max() <= 2e-6 * k ** 0.5 * np.abs(want).max()
    else:  # the output's float16 rounding
        for out in (general, got):
            assert np.abs(out - want).max() <= 2 * 2.0 ** -11 * np.abs(want).max()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_gated_matvecs_equal_the_activation_then_the_product(activation, dtype):
    """ffn_down(act(gate) · up) read from [gate; up] (affine and Q6_K) against MLX's activation, then
    the plain matvec."""
    import mlx.nn as nn

    from mlx_llama import cuda_affine

    k = 1024
    a = (mx.random.normal((1, 1, 2 * k), key=mx.random.key(3)) * 2).astype(dtype)
    gate, up = (p.astype(mx.float32) for p in mx.split(a, 2, axis=-1))
    # in float32, rounded once to the dtype (as the kernels; MLX's float16 activation rounds each step)
    glu = ((nn.silu(gate) if activation == "silu" else nn.gelu_approx(gate)) * up).astype(dtype)
    act = cuda_affine.ACTIVATIONS[activation]
    wq, scales, biases, _ = affine_weights(80, k, 4, seed=2)
    fields = random_fields(quants.Q6_K, 40, k // 256, seed=1)
    if dtype == mx.float16:  # Q6_K's random blocks hold values up to 4e4: products beyond float16's range
        fields = dict(fields, d=fields["d"] / 1024)
    pairs = [(cuda_affine.matvec(a, wq, scales, biases, 4, act=act), cuda_affine.matvec(glu, wq, scales, biases, 4)),
             (cuda_kernels.block_matvec(a, quants.Q6_K, fields, act=act), cuda_kernels.block_matvec(glu, quants.Q6_K, fields))]
    tol = 2e-3 if dtype == mx.float16 else 1e-5
    for got, want in pairs:
        want = np.array(want.astype(mx.float32))
        assert got.shape == want.shape
        assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= tol * np.abs(want).max()


# -- the tensor-core matvec (`cuda_mma`) ----------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "affine"])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("rows, k", [(70, 1024), (256, 4096), (16, 384)])
def test_mma_matvec_equals_the_exact_product(symmetric, act, rows, k, monkeypatch):
    """float16 activations: float32 sums of the exact weights (as the scalar kernel), for the
    symmetric (Q4_0) and general forms, with and without the gated activation read in; 70 rows:
    a partial tile of 16."""
    import mlx.nn as nn

    from mlx_llama import cuda_affine, cuda_mma

    monkeypatch.setenv("MLX_LLAMA_AFFINE_MMA", "1")
    rng = np.random.default_rng(rows + act)
    wq = mx.array(rng.integers(0, 2 ** 32, (rows, k // 8), dtype=np.uint32))
    scales = mx.array(rng.uniform(0.001, 0.01, (rows, k // 32)), mx.float16)
    biases = scales * -8 if symmetric else mx.array(rng.uniform(-0.08, 0.0, (rows, k // 32)), mx.float16)
    dense = np.array(mx.dequantize(wq, scales, biases, group_size=32, bits=4, dtype=mx.float32)).astype(np.float64)
    a = mx.array(rng.standard_normal((1, 1, (2 if act else 1) * k)) * 2, mx.float16)
    assert cuda_mma.serves(a, 4, k, act)
    x = a
    if act:  # in float32, rounded once to float16 (as the kernels)
        gate, up = (p.astype(mx.float32) for p in mx.split(a, 2, axis=-1))
        x = ((nn.silu(gate) if act == 1 else nn.gelu_approx(gate)) * up).astype(mx.float16)
    want = np.array(x.astype(mx.float32)).astype(np.float64).reshape(1, -1) @ dense.T
    got = np.array(cuda_mma.matvec(a, wq, scales, biases, symmetric=symmetric, act=act).astype(mx.float32))
    scalar = np.array(cuda_affine.matvec(a, wq, scales, biases, 4, symmetric=symmetric, act=act).astype(mx.float32))
    assert got.shape == (1, 1, rows)
    tol = (4 if act else 2) * 2.0 ** -11 * np.abs(want).max()  # the output's float16 rounding (and the activation's)
    assert np.abs(got.reshape(1, -1) - want).max() <= tol
    assert np.abs(got - scalar).max() <= tol


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("nt", [1, 3])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_matvec_epilogue_applies_the_gated_activation(activation, nt, dtype):
    """Gate and up rows interleaved (`fusion`): the matvec writes act(gate) · up, gate and up rounded
    to the dtype first (as the unfused products store them), against the plain matvec's rows."""
    import mlx.nn as nn

    from mlx_llama import cuda_affine

    wq, scales, biases, _ = affine_weights(2 * 45, 1024, 4, seed=nt)  # 45 pairs: a partial block
    x = mx.random.normal((nt, 1024), key=mx.random.key(5)).astype(dtype)
    act = cuda_affine.ACTIVATIONS[activation]
    plain = cuda_affine.matvec(x, wq, scales, biases, 4).astype(mx.float32)
    gate, up = plain[:, 0::2], plain[:, 1::2]
    want = ((nn.silu(gate) if activation == "silu" else nn.gelu_approx(gate)) * up).astype(dtype)
    got = cuda_affine.matvec(x, wq, scales, biases, 4, epilogue=act)
    assert got.shape == (nt, 45) and got.dtype == dtype
    tol = 2e-3 if dtype == mx.float16 else 1e-5
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=tol,
                               atol=tol * float(mx.abs(want).max().astype(mx.float32)))


def test_decode_attention_in_place_writes_the_buffer_row():
    """in_place: the new key and value land in the cache buffer at the position (the compiled
    step's scatter left out), the same values the kernel returns; no other row changes."""
    from mlx_llama import cuda_attention
    from mlx_llama.model import RoPE

    d, hq, hkv, cap, pos = 64, 8, 2, 256, 100
    q, k, v, keys, values = decode_case(d, hq, hkv, cap, mx.float16, 7)
    cache = mx.concatenate([keys, values], axis=1)
    mx.eval(cache)
    before = np.array(cache)
    form = RoPE(d, d, False, 10000.0, 1.0).kernel_form()
    want, kv_want = cuda_attention.decode_attention(q, k, v, cache, mx.array(pos, mx.int32), 0.125, heads=hq, rope=form)
    got, kv_new = cuda_attention.decode_attention(q, k, v, cache, mx.array(pos, mx.int32), 0.125, heads=hq, rope=form,
                                                  in_place=True)
    mx.eval(want, kv_want, got, kv_new)
    after = np.array(cache)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    np.testing.assert_array_equal(after[:, :, pos], np.array(kv_new)[:, :, 0])
    after[:, :, pos] = before[:, :, pos]
    np.testing.assert_array_equal(after, before)
