"""What the loader does differently per device, checked on the CPU: projections fused at load
(`fusion`, on by default on NVIDIA GPUs) give the same numbers, and Q2_K/Q6_K take the form the
device serves best (`quants.subblock16_form`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama import quants
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.loader import load_model

TOKENS = mx.array([list(range(3, 3 + 40 * 7, 7))])


@pytest.mark.parametrize("arch, tensor_type, fused", [
    ("llama", "Q8_0", (True, True)),
    ("qwen2", "F32", (True, True)),  # biases on q/k/v: fused too
    ("gemma3", "Q4_0", (True, True)),
    ("llama", {"default": "Q4_0", "attn_v": "Q8_0"}, (False, True)),  # v of another form: q and k fused alone
    ("gemma3", {"default": "Q4_0", "attn_v": "Q8_0"}, (False, True)),  # the same, with q/k norms
    ("llama", {"default": "Q4_0", "attn_k": "Q8_0"}, (False, True)),  # q, k of two forms: all kept apart
])
def test_fused_projections_are_the_same_numbers(arch, tensor_type, fused, tiny_gguf):
    path = tiny_gguf(tensor_type, arch=arch, embed_std=0.5, n_layers=3 if arch == "gemma3" else 2)
    apart = load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=False)
    together = load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=True)
    assert (together.config.fused_qkv, together.config.fused_gate_up) == fused
    assert ("attn_qkv" in together.blk[0].attn) == fused[0] and "ffn_gate" not in together.blk[0].ffn
    qk_alone = not fused[0] and isinstance(tensor_type, dict) and "attn_v" in tensor_type
    assert together.config.fused_qk == qk_alone and ("attn_qk" in together.blk[0].attn) == qk_alone
    same_numbers(apart(TOKENS), together(TOKENS))


@pytest.mark.parametrize("arch, tensor_type", [("llama", "Q4_0"), ("gemma3", "Q8_0"), ("qwen2", "F32")])
def test_interleaved_gate_and_up_are_the_same_numbers(arch, tensor_type, tiny_gguf, monkeypatch):
    """MLX_LLAMA_CUDA_FUSE with "act": gate and up rows alternate in the fused ffn_up (for the CUDA
    matvec that applies the activation as it writes; here the product is split back)."""
    path = tiny_gguf(tensor_type, arch=arch, embed_std=0.5, n_layers=3 if arch == "gemma3" else 2)
    apart = load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=False)
    monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "sym,norm,rope,act")
    together = load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=True)
    assert together.config.gate_up_interleaved and together.blk[0].ffn.interleaved
    up = together.blk[0].ffn.ffn_up
    w = up["weight"] if "scales" not in up else mx.dequantize(up["weight"], up["scales"], up["biases"], group_size=32, bits=up.bits)
    layer = apart.blk[0].ffn
    g, u = ((m["weight"] if "scales" not in m else mx.dequantize(m["weight"], m["scales"], m["biases"], group_size=32, bits=m.bits))
            for m in (layer.ffn_gate, layer.ffn_up))
    np.testing.assert_array_equal(np.array(w[0::2]), np.array(g))  # rows: gate 0, up 0, gate 1, …
    np.testing.assert_array_equal(np.array(w[1::2]), np.array(u))
    same_numbers(apart(TOKENS), together(TOKENS))


def same_numbers(want: mx.array, got: mx.array) -> None:
    """The same logits to float32 rounding: the stacked rows are the same weights, but a BLAS (here
    OpenBLAS on an AMD EPYC) may sum a taller matrix's products in another order."""
    want, got = np.array(want), np.array(got)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_subblock16_form_by_device(monkeypatch):
    """The file's blocks on the CPU and with CUDA, dense float16 on another GPU (Metal); a form set
    by hand wins."""
    assert quants.subblock16_form() == "blocks"  # here: the CPU
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert quants.subblock16_form() == "dense"
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert quants.subblock16_form() == "blocks"
    try:
        quants.set_subblock16_form(8)
        assert quants.subblock16_form() == 8
    finally:
        quants.set_subblock16_form()


def test_verbose_line_names_the_cuda_pieces(monkeypatch):
    """`mlx_llama … -v` on an NVIDIA GPU says which CUDA decode kernels run (nothing elsewhere)."""
    from mlx_llama import cuda_affine
    from mlx_llama.cli.common import _cuda_pieces

    assert _cuda_pieces() == ""  # here: the CPU
    monkeypatch.setattr(cuda_affine, "available", lambda: True)
    assert _cuda_pieces() == " | CUDA: scalar matvecs, CUDA kernel attention, fused sym,norm,rope,act,inplace"
    monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "none")
    monkeypatch.setenv("MLX_LLAMA_CUDA_ATTENTION", "0")
    monkeypatch.setenv("MLX_LLAMA_AFFINE_MMA", "1")
    assert _cuda_pieces() == " | CUDA: tensor cores matvecs, MLX's attention, fused none"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tail_products_reach_their_add_and_norm(arch, tiny_gguf, monkeypatch):
    """The "tail" piece's wiring, on the CPU: with CUDA pretended and the two matvecs stood in for
    by MLX's ops, each output projection of a compiled decode step is deferred (`layers.Pending`)
    and computed by the add and norm after it — or alone where a sandwich norm (gemma3) or the
    model's end needs it — and the logits, prompt and compiled decode steps alike, are the plain
    model's."""
    from mlx_llama import cuda_affine, cuda_attention, layers
    from mlx_llama.decode_step import decoder
    from mlx_llama.generation import prefill

    path = tiny_gguf("Q8_0", arch=arch, embed_std=0.5, n_layers=3 if arch == "gemma3" else 2)

    def run(m):
        cache = m.make_cache()
        out = [prefill(m, mx.array([3, 17, 40], mx.int32), cache)]  # 3 rows: matvecs, deferred
        step = decoder(m, cache, compiled=True)
        for t in (5, 9, 2):
            out.append(step(mx.array([t], mx.int32)))
        return np.array(mx.concatenate(out))

    want = run(load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=False))  # before the stand-ins

    def matvec(x, w, scales, biases, bits, **kw):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=bits)

    fused = []

    def matvec_add_norm(x, w, scales, biases, bits, resid, weight, eps, counter, symmetric=False):
        fused.append(x.shape)
        h = resid + matvec(x, w, scales, biases, bits)
        return h, mx.fast.rms_norm(h, weight, eps)

    monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "tail")
    monkeypatch.setattr(cuda_affine, "available", lambda: True)
    monkeypatch.setattr(cuda_affine, "matvec", matvec)
    monkeypatch.setattr(cuda_affine, "matvec_add_norm", matvec_add_norm)
    monkeypatch.setattr(cuda_attention, "available", lambda: False)
    model = load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False, fuse=False)
    assert type(model.blk[0].attn.attn_output) is layers.AffineLinear
    got = run(model)
    n_layers = len(model.blk)
    sandwich = "post_attention_norm" in model.blk[0]
    assert len(fused) == (0 if sandwich else 2 * n_layers - 1), fused  # the first trace (not the prompt, op by op)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
