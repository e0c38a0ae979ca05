"""The compiled decode step (`decode_step`) against the model run op by op.

The default for one sequence on the CPU and NVIDIA GPUs. Here on the CPU, with float32
activations (the CPU mode: the `kernels` attention and SwiGLU op by op) and float16 (MLX's own
ops, as on a GPU), and a cache step of 8 positions, so that a few dozen tokens cross several
buffer reallocations (each a new trace) and the sliding window of gemma3 (4 positions) moves
over them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from mlx_llama import cuda_affine, decode_step
from mlx_llama.cache import KVCache
from mlx_llama.generation import generate_tokens, prefill
from mlx_llama.sample import SamplingParams
from test_architectures import PEAKED, VARIANTS
from test_tokenizer import vocab_path

PROMPT = list(range(3, 3 + 13 * 7, 7))  # 13 tokens: the first decoded one lands mid-buffer


def tiny(tiny_gguf, tensor_type: str, **kw):
    """A tiny file with llama.cpp's test vocabulary (kept offline, as on the GPU host)."""
    return tiny_gguf(tensor_type, vocab_from=vocab_path("llama-spm"), **kw)


@pytest.fixture
def small_steps(monkeypatch):
    monkeypatch.setattr(KVCache, "step", 8)


def decode(model, compiled: bool, monkeypatch, steps: int = 20, given: bool = False) -> np.ndarray:
    """Greedy logits of `steps` decoded tokens after PROMPT, with the step compiled or not; given:
    each step fed a fixed token instead of the last step's choice (no data path from one step to
    the next), all the steps evaluated together."""
    monkeypatch.setenv("MLX_LLAMA_COMPILE", "1" if compiled else "0")
    cache = model.make_cache()
    y = mx.argmax(prefill(model, mx.array(PROMPT, mx.int32), cache), -1).astype(mx.int32)
    forward = decode_step.decoder(model, cache)
    out = []
    for i in range(steps):
        logits = forward(y)
        y = mx.array([PROMPT[i % len(PROMPT)]], mx.int32) if given else mx.argmax(logits, -1).astype(mx.int32)
        out.append(logits)
    assert cache[0].offset == len(PROMPT) + steps
    return np.array(mx.concatenate(out).astype(mx.float32))


FAST = ("llama-fused-qkv-biases", "qwen3-head-size", "gemma3")  # the suite's time budget: the rest with -m slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_compiled_step_equals_the_model_op_by_op(name, tiny_gguf, small_steps, monkeypatch):
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q8_0", **PEAKED, **VARIANTS[name]), dtype=mx.float16, cpu_dequantize=False)
    assert not model.blk[0].attn.cpu_kernels  # float16: MLX's attention, as on a GPU
    eager, compiled = decode(model, False, monkeypatch), decode(model, True, monkeypatch)
    assert model._compiled_decoder is not None  # it did run compiled
    # float16 logits of size ~5: attention over the whole buffer (masked, or the CUDA kernel) sums
    # in another order than MLX's over the positions held; ~10 float16 steps at most
    assert np.abs(eager - compiled).max() <= 4e-2, name
    assert (eager.argmax(-1) == compiled.argmax(-1)).mean() >= 0.95


NEEDS_CUDA = pytest.mark.skipif(not cuda_affine.available(), reason="needs MLX's CUDA backend and an NVIDIA GPU")


@NEEDS_CUDA
@pytest.mark.parametrize("pieces", ["none", "sym,norm,rope", "sym,norm,rope,act", "sym,norm,rope,inplace",
                                    "sym,norm,rope,act,inplace", "sym,norm,rope,glu", "sym,norm,rope,act,inplace,tail",
                                    "tail"])
@pytest.mark.parametrize("name", ["llama-fused-qkv-biases", "gemma3", "llama"])  # llama: no biases, no sandwich: tail runs
def test_fused_cuda_pieces_equal_the_model_op_by_op(pieces, name, tiny_gguf, small_steps, monkeypatch):
    """On an NVIDIA GPU, each set of fused decode kernels (MLX_LLAMA_CUDA_FUSE, read at load and
    at every step) against the step op by op with none of them."""
    path = tiny(tiny_gguf, "Q4_0", **PEAKED, **VARIANTS[name])
    monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", "none")
    plain, _ = mlx_llama.load(path, dtype=mx.float16, cpu_dequantize=False)
    eager = decode(plain, False, monkeypatch)
    monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", pieces)
    model, _ = mlx_llama.load(path, dtype=mx.float16, cpu_dequantize=False)
    compiled = decode(model, True, monkeypatch)
    assert np.abs(eager - compiled).max() <= 4e-2, pieces
    assert (eager.argmax(-1) == compiled.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("pieces", [None, pytest.param("sym,norm,rope,act,inplace,tail", marks=NEEDS_CUDA)],
                         ids=["defaults", "tail"])  # the pieces run on NVIDIA GPUs only: elsewhere the same as the defaults
@pytest.mark.parametrize("name", ["llama", "gemma3"])  # llama: the tail's products deferred (no biases)
def test_steps_on_given_tokens_evaluated_together(name, pieces, tiny_gguf, small_steps, monkeypatch):
    """Steps whose tokens do not come from the last step's logits, built before any is evaluated
    (one graph): each still runs after the one before — on an NVIDIA GPU the attention writes the
    cache behind MLX's back ("inplace"), the "tail" matvecs count their blocks in a buffer of their
    own, and a CUDA graph orders kernels by the buffers they declare."""
    if pieces is not None:
        monkeypatch.setenv("MLX_LLAMA_CUDA_FUSE", pieces)
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q4_0", **PEAKED, **VARIANTS[name]), dtype=mx.float16, cpu_dequantize=False)
    eager = decode(model, False, monkeypatch, steps=24, given=True)  # over two cache growths (steps of 8)
    compiled = decode(model, True, monkeypatch, steps=24, given=True)
    assert np.abs(eager - compiled).max() <= 4e-2, name
    assert (eager.argmax(-1) == compiled.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["llama", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_q_and_k_fused_alone(name, tiny_gguf, small_steps, monkeypatch):
    """v of another form than q and k (as in Q4_K_M files): q and k fused at load (`fusion`, on by
    default on NVIDIA GPUs), the attention kernel reading them from one array and v from another."""
    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.loader import load_model

    path = tiny(tiny_gguf, {"default": "Q4_0", "attn_v": "Q8_0"}, **PEAKED, **VARIANTS[name])
    apart = load_model(GGUFFile(path), dtype=mx.float16, cpu_dequantize=False, fuse=False)
    model = load_model(GGUFFile(path), dtype=mx.float16, cpu_dequantize=False, fuse=True)
    assert model.config.fused_qk and "attn_qk" in model.blk[0].attn
    eager, compiled = decode(apart, False, monkeypatch), decode(model, True, monkeypatch)
    assert np.abs(eager - compiled).max() <= 4e-2, name
    assert (eager.argmax(-1) == compiled.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_compiled_step_in_the_cpu_mode(name, tiny_gguf, small_steps, monkeypatch):
    """float32, weights expanded (the CPU's default): float32 sums in another order only."""
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q8_0", **PEAKED, **VARIANTS[name]), dtype=mx.float32)
    assert model.blk[0].attn.cpu_kernels == (mx.default_device() == mx.cpu)
    eager, compiled = decode(model, False, monkeypatch), decode(model, True, monkeypatch)
    assert np.abs(eager - compiled).max() <= 1e-4, name
    assert (eager.argmax(-1) == compiled.argmax(-1)).all()


def test_generation_gives_the_same_tokens(tiny_gguf, small_steps, monkeypatch):
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q4_0", **PEAKED), dtype=mx.float16, cpu_dequantize=False)
    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("MLX_LLAMA_COMPILE", switch)
        runs[switch] = list(generate_tokens(model, PROMPT, SamplingParams(temp=0), 20))
    assert runs["0"] == runs["1"] and len(runs["1"]) == 20


@pytest.mark.parametrize("ahead", [pytest.param("2", marks=pytest.mark.slow), "4"])
def test_steps_queued_further_ahead_give_the_same_tokens(ahead, tiny_gguf, small_steps, monkeypatch):
    """MLX_LLAMA_DECODE_AHEAD: the same tokens; stopped early, the cache holds at most `ahead` steps
    past the tokens handed out, none past max_tokens."""
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q4_0", **PEAKED), dtype=mx.float16, cpu_dequantize=False)
    want = list(generate_tokens(model, PROMPT, SamplingParams(temp=0), 20))
    monkeypatch.setenv("MLX_LLAMA_DECODE_AHEAD", ahead)
    cache = model.make_cache()
    assert list(generate_tokens(model, PROMPT, SamplingParams(temp=0), 20, cache=cache)) == want
    assert cache[0].offset == len(PROMPT) + 19  # the last token is never fed back
    cache = model.make_cache()
    got = []
    for t in generate_tokens(model, PROMPT, SamplingParams(temp=0), 20, cache=cache):
        got.append(t)
        if len(got) == 5:
            break
    assert got == want[:5] and len(PROMPT) + 5 <= cache[0].offset <= len(PROMPT) + 4 + int(ahead)


def test_when_it_is_used(tiny_gguf, monkeypatch):
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q4_0"))
    prefill(model, mx.array(PROMPT, mx.int32), cache := model.make_cache())
    monkeypatch.setenv("MLX_LLAMA_COMPILE", "1")
    assert decode_step.enabled(model, cache)
    assert not decode_step.enabled(model, model.make_cache())  # no buffers before the prompt
    assert not decode_step.enabled(model, [None] * len(cache))  # not a sequence's own caches
    monkeypatch.setenv("MLX_LLAMA_COMPILE", "0")
    assert not decode_step.enabled(model, cache)
    monkeypatch.delenv("MLX_LLAMA_COMPILE")
    measured = mx.default_device() == mx.cpu or mx.cuda.is_available()  # Metal: opt in
    assert decode_step.enabled(model, cache) == measured


def test_arrays_made_on_first_use_exist_before_the_trace(tiny_gguf):
    """RoPE's frequency factors (Llama-3.1 files) become MLX's freqs on first use: a step compiled
    before any other call must not keep the trace's placeholder for them."""
    model, _ = mlx_llama.load(tiny(tiny_gguf, "Q8_0", **VARIANTS["llama-rope-freqs"]), dtype=mx.float16, cpu_dequantize=False)
    rope = model.blk[0].attn.rope
    assert rope._freqs is None
    decode_step.CompiledDecoder(model)
    assert isinstance(rope._freqs, mx.array) and rope._freqs.shape == (rope.dims // 2,)
    np.testing.assert_array_equal(np.array(rope._freqs), np.array(rope.frequencies()))
