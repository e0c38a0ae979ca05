"""Every architecture and variant on tiny random files, against two oracles: the float64
reference (`reference.py`, exact) and llama.cpp (its own graphs for these architectures).

The files are made by `scripts/make_fixture.make_tiny` with peaked logits (embeddings spread so
that a position's top-2 gap is typically ~1), 64 tokens each."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from gguf_edit import V, rewrite_gguf

TOKENS = list(range(3, 3 + 64 * 7, 7))
PEAKED = dict(embed_std=0.5)

VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-rope-freqs": dict(arch="llama", rope_freqs=True),  # Llama-3.1/3.2
    "llama-fused-qkv-biases": dict(arch="llama", fused_qkv=True, biases=("attn_qkv", "attn_output", "ffn_down")),
    "qwen2": dict(arch="qwen2", tied=False, biases=("attn_q", "attn_k", "attn_v", "output")),
    "qwen3-head-size": dict(arch="qwen3", head_dim=32, n_kv_heads=1),  # key_length ≠ hidden / heads
    "phi3-long-rope": dict(arch="phi3", long_rope=True, rope_dims=12, context_length=256),  # Phi-4-mini's partial rotary
    "phi3-short-rope": dict(arch="phi3", long_rope=True, fused_qkv=False, context_length=64),
    "gemma3": dict(arch="gemma3", n_layers=3, softcap=20.0),  # two local layers (window 4), one global
}
# llama.cpp's CPU GELU is a float16 lookup table: gemma3 differs from the exact value by ~3e-3
LLAMA_CPP_BOUND = {"gemma3": 1e-2}


def ours(path, cpu_dequantize=True) -> np.ndarray:
    model, _ = mlx_llama.load(path, dtype=mx.float32, cpu_dequantize=cpu_dequantize)
    return np.array(model(mx.array([TOKENS]))[0])


def llama_cpp_logits(path, n_ctx: int, f32_cache: bool) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is the second oracle")
    kv = dict(type_k=0, type_v=0) if f32_cache else {}  # GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, **kv)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


@pytest.mark.parametrize("name", VARIANTS)
def test_architecture_against_both_oracles(name, tiny_gguf, reference, capsys):
    path = tiny_gguf("F32", **PEAKED, **VARIANTS[name])
    ref = reference(path)
    mine = ours(path)
    d_ref = np.abs(mine - ref.logits(TOKENS)).max()
    report = f"{name}: vs float64 reference max|Δ| {d_ref:.1e}, top-1 {top1(mine, ref.logits(TOKENS)):.3f}"
    assert d_ref <= 1e-3, report
    exact = llama_cpp_logits(path, ref.cfg.context, f32_cache=True)  # llama.cpp with a float32 KV cache
    usual = llama_cpp_logits(path, ref.cfg.context, f32_cache=False)  # and with its default float16 one
    d_exact, d_usual = np.abs(mine - exact).max(), np.abs(mine - usual).max()
    report += (f"; vs llama.cpp f32 KV max|Δ| {d_exact:.1e}, top-1 {top1(mine, exact):.3f}; "
               f"f16 KV max|Δ| {d_usual:.1e}, top-1 {top1(mine, usual):.3f} "
               f"(llama.cpp's f16 KV vs its f32 KV: {np.abs(usual - exact).max():.1e})")
    with capsys.disabled():
        print("\n  " + report, end="")
    assert d_exact <= LLAMA_CPP_BOUND.get(VARIANTS[name]["arch"], 1e-3), report
    assert d_usual <= 2e-2 and top1(mine, usual) >= 0.95, report


@pytest.mark.parametrize("name", ["qwen2", "phi3-long-rope", "gemma3"])
def test_quantized_weights_and_incremental_decoding(name, tiny_gguf, reference):
    """Q8_0 weights kept quantized (MLX kernels, biases on quantized layers), decoded token by
    token through the KV cache (past gemma3's 4-position window): the reference's logits."""
    path = tiny_gguf("Q8_0", **PEAKED, **VARIANTS[name])
    model, _ = mlx_llama.load(path, dtype=mx.float32, cpu_dequantize=False)
    cache = model.make_cache()
    steps = [np.array(model(mx.array([TOKENS[:5]]), cache)[0])]
    steps += [np.array(model(mx.array([[t]]), cache)[0]) for t in TOKENS[5:20]]
    np.testing.assert_allclose(np.concatenate(steps), reference(path).logits(TOKENS[:20]), atol=2e-3)


def test_rope_factors_are_applied(tiny_gguf, tmp_path):
    """The same Llama-3 file without its rope_freqs tensor gives very different logits."""
    path = tiny_gguf("F32", **PEAKED, **VARIANTS["llama-rope-freqs"])
    dropped = tmp_path / "no_rope_freqs.gguf"
    rewrite_gguf(path, dropped, drop_tensors=["rope_freqs.weight"])
    assert np.abs(ours(path) - ours(dropped)).max() > 1.0


def test_sliding_window_is_applied(tiny_gguf, tmp_path):
    """Gemma-3's local layers: a window as long as the context gives very different logits."""
    path = tiny_gguf("F32", **PEAKED, **VARIANTS["gemma3"])
    wide = tmp_path / "wide_window.gguf"
    rewrite_gguf(path, wide, set_keys={"gemma3.attention.sliding_window": (256, V.UINT32)})
    assert np.abs(ours(path) - ours(wide)).max() > 1.0


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case, edit, expected", [
    ("unused tensor", dict(add_tensors={"blk.1.attn_q.bias": np.zeros(64, np.float32)}),
     "tensor 'blk.1.attn_q.bias' is not used by architecture 'qwen3'"),
    ("unknown architecture", dict(set_keys={"general.architecture": ("mamba", V.STRING)}),
     "unsupported architecture 'mamba'"),
    ("unknown rope scaling", dict(set_keys={"qwen3.rope.scaling.type": ("yarn", V.STRING),
                                            "qwen3.rope.scaling.factor": (4.0, V.FLOAT32)}),
     "unsupported rope scaling type 'yarn'"),
    ("unknown key", dict(set_keys={"qwen3.expert_count": (8, V.UINT32)}),
     "metadata key 'qwen3.expert_count' = 8 is not supported for architecture 'qwen3'"),
    ("layer count", dict(set_keys={"qwen3.block_count": (1, V.UINT32)}),
     "block_count is 1 but the file holds tensors for layers 0-1"),
])
def test_what_a_file_asks_and_we_do_not_do_is_one_line(case, edit, expected, tiny_gguf, tmp_path):
    path = tmp_path / "edited.gguf"
    rewrite_gguf(tiny_gguf("F32", arch="qwen3"), path, **edit)
    r = cli("generate", "-m", str(path), "hi", "-n", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, (case, r.stderr)


def test_info_shows_the_settings(tiny_gguf):
    r = cli("info", str(tiny_gguf("F32", **PEAKED, **VARIANTS["gemma3"])))
    assert r.returncode == 0, r.stderr
    for text in ("NEOX halves", "q/k RMSNorm", "sandwich", "gelu_tanh-gated", "× √hidden",
                 "4 positions on 2 of 3 layers (RoPE base 10000 there)", "logit soft-capping: 20"):
        assert text in r.stdout, (text, r.stdout)
    phi = cli("info", str(tiny_gguf("F32", **PEAKED, **VARIANTS["phi3-long-rope"])))
    assert "factors rope_factors_long" in phi.stdout and "12 of 16 dims" in phi.stdout and "× 1.19" in phi.stdout
