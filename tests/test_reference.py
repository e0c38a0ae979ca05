"""Tests of the float64 oracle (tests/reference.py) and the tiny fixture writer."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from reference import apply_rope, rope_inv_freq

ENGLISH = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg developed a system of movable metal type in the German city of Mainz. His "
    "invention made books cheaper and faster to produce, and within a few decades printing "
    "shops had spread across Europe, changing how people learned, worshipped and argued "
    "about ideas. Newspapers, pamphlets and scientific journals followed."
)


def _random_tokens(n, vocab=49152, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


@contextlib.contextmanager
def _llama_cpp(path, n_ctx=256):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) not importable")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, verbose=False, n_threads=2, seed=0)
    try:
        yield llm
    finally:
        close = getattr(llm, "close", None)
        if close is not None:
            close()


def _llama_cpp_logits(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


# --------------------------------------------------------------- internal consistency
@pytest.mark.parametrize("tensor_type", ["F32", "Q4_1"])
def test_full_pass_equals_incremental(tiny_gguf, reference, tensor_type):
    ref = reference(tiny_gguf(tensor_type))  # 4 query heads sharing 2 kv heads
    toks = _random_tokens(24, ref.cfg.vocab)
    full = ref.logits(toks)
    assert full.shape == (24, ref.cfg.vocab) and full.dtype == np.float64
    assert np.all(np.isfinite(full))

    cache = ref.new_cache()
    step = np.concatenate([ref.forward([t], cache) for t in toks])
    assert cache.offset == 24
    assert np.max(np.abs(step - full)) <= 1e-9

    cache = ref.new_cache()  # uneven chunks: prefill + continuation
    chunks = [ref.forward(toks[:7], cache), ref.forward(toks[7:8], cache), ref.forward(toks[8:], cache)]
    assert np.max(np.abs(np.concatenate(chunks) - full)) <= 1e-9


def test_greedy_matches_logits(tiny_gguf, reference):
    ref = reference(tiny_gguf("F32"))
    prompt = _random_tokens(5, ref.cfg.vocab, seed=3)
    toks, gaps = ref.greedy(prompt, 6)
    assert len(toks) == len(gaps) == 6
    full = ref.logits(prompt + toks[:-1])[len(prompt) - 1:]
    assert toks == [int(i) for i in full.argmax(-1)]
    s = np.sort(full, axis=-1)
    np.testing.assert_allclose(gaps, s[:, -1] - s[:, -2], atol=1e-9)
    assert all(g >= 0 for g in gaps)


def test_rope_properties():
    head_dim, rope_dims = 16, 8  # partial rotary: dims >= 8 must pass through
    inv = rope_inv_freq(rope_dims, 10000.0)
    np.testing.assert_allclose(inv, 10000.0 ** (-np.arange(0, rope_dims, 2) / rope_dims))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, head_dim))
    pos = np.arange(5)
    y = apply_rope(x, pos, inv, rope_dims)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # position 0: identity
    np.testing.assert_array_equal(y[..., rope_dims:], x[..., rope_dims:])
    # adjacent pairs are rotated: pair norms preserved, first pair angle == pos (freq 1)
    pn = lambda a: a[..., 0:rope_dims:2] ** 2 + a[..., 1:rope_dims:2] ** 2  # noqa: E731
    np.testing.assert_allclose(pn(y), pn(x), rtol=1e-12)
    e0 = np.zeros((1, 5, head_dim))
    e0[..., 0] = 1.0
    z = apply_rope(e0, pos, inv, rope_dims)
    np.testing.assert_allclose(z[0, :, 0], np.cos(pos), atol=1e-12)
    np.testing.assert_allclose(z[0, :, 1], np.sin(pos), atol=1e-12)
    # linear scaling: position p with factor 4 == position p/4 unscaled
    np.testing.assert_allclose(apply_rope(x, pos * 4, inv, rope_dims, 4.0), y, atol=1e-12)
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = rng.standard_normal((2, 1, 1, head_dim))
    dot = lambda m, n: float(apply_rope(q, [m], inv, rope_dims)[0, 0] @ apply_rope(k, [n], inv, rope_dims)[0, 0])  # noqa: E731
    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-10)


# --------------------------------------------------------------- the fixture writer
MIXED = {  # one fixture exercising every storage type (one GGUF load instead of six)
    "attn_q": "F16", "attn_k": "BF16", "attn_v": "Q4_0", "attn_output": "Q4_1",
    "ffn_gate": "Q8_0", "blk.1.ffn_up.weight": "Q4_0", "token_embd": "Q8_0", "output": "BF16",
    "default": "F32",
}
TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}


def test_fixture_types(tiny_gguf, reference):
    mixed = reference(tiny_gguf(MIXED, tied=False))
    plain = reference(tiny_gguf("F32", tied=False))  # same seed -> same underlying weights
    types = mixed.tensor_types
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.1.attn_k.weight"] == "BF16"
    assert types["blk.0.attn_v.weight"] == "Q4_0"
    assert types["blk.1.attn_output.weight"] == "Q4_1"
    assert types["blk.0.ffn_gate.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "F32" and types["blk.1.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "BF16"
    assert types["blk.1.ffn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert not mixed.tied and set(plain.tensor_types.values()) == {"F32"}
    assert mixed.cfg.vocab == 49152  # SmolLM2 tokenizer copied
    assert (mixed.cfg.n_layers, mixed.cfg.hidden, mixed.cfg.n_heads, mixed.cfg.n_kv_heads,
            mixed.cfg.ffn) == (2, 64, 4, 2, 128)
    for li in range(2):
        for role, w in mixed.layers[li].items():  # role: "attn_q.weight", ...
            tol = TOL[types[f"blk.{li}.{role}"]]
            err = np.max(np.abs(w - plain.layers[li][role]))
            assert err <= tol, (li, role, err)
            if tol:
                assert err > 0, (li, role)  # really stored in the lossy type
    assert 0 < np.max(np.abs(mixed.tok_embd - plain.tok_embd)) <= 2 * TOL["Q8_0"]
    assert 0 < np.max(np.abs(mixed.output - plain.output)) <= 2 * TOL["BF16"]


# --------------------------------------------------------------- against llama.cpp
TINY_CASES = {
    "f32-gqa2": dict(tensor_type="F32"),
    "f32-untied-gqa4-base500": dict(tensor_type="F32", tied=False, n_layers=1, n_heads=8, n_kv_heads=2,
                                    hidden=128, ffn=256, rope_base=500.0),
    "f32-mha-3layers-rope-linear4": dict(tensor_type="F32", n_layers=3, n_heads=4, n_kv_heads=4, extra_metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_matches_llama_cpp(tiny_gguf, reference, case):
    """With float weights llama.cpp's CPU path is exact up to its F16 KV cache."""
    path = tiny_gguf(**TINY_CASES[case])
    ref = reference(path)
    toks = _random_tokens(40, ref.cfg.vocab)
    with _llama_cpp(path) as llm:
        theirs = _llama_cpp_logits(llm, toks)
    ours = ref.logits(toks)
    assert theirs.shape == ours.shape
    assert np.max(np.abs(ours - theirs)) < 0.05


def test_smollm2_matches_llama_cpp(smollm2_path, reference):
    """llama.cpp quantizes activations to 8 bits for Q4_1/Q8_0 dot products, so
    logits differ by up to ~1; the top-1 token must still agree almost always."""
    ref = reference(smollm2_path)
    with _llama_cpp(smollm2_path) as llm:
        toks = llm.tokenize(ENGLISH.encode(), add_bos=False, special=False)[:64]
        assert len(toks) == 64
        theirs = _llama_cpp_logits(llm, toks)
    ours = ref.logits(toks)
    assert ours.shape == (64, 49152)
    d = np.abs(ours - theirs)
    agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    print(f"SmolLM2 vs llama.cpp: max|d|={d.max():.3f} mean|d|={d.mean():.4f} top1={agree:.3f}")
    assert agree >= 0.90
    assert d.max() < 3.0
