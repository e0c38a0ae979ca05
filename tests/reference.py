"""Exact float64 NumPy reference ("oracle") for the GGUF architectures mlx_llama runs.

This module is deliberately independent of ``mlx_llama``: it reads the GGUF with
``gguf.GGUFReader``, dequantizes every tensor with ``gguf.quants.dequantize`` and runs a plainly
written decoder in float64, following llama.cpp's graphs (src/models/{llama,qwen2,qwen3,phi3,
gemma3}.cpp) and hparams loading:

* RMSNorm:   ``x / sqrt(mean(x**2) + eps) * w`` (Gemma's ``1 + w`` is folded into w by the converter).
* RoPE:      the first ``rope_dims`` dims of a head; ``llama`` rotates adjacent pairs
  ``(x[2i], x[2i+1])`` (its converter permuted Q/K), the others (NEOX) pairs
  ``(x[i], x[i + rope_dims/2])``; angle ``(pos * scale) * base**(-2i / rope_dims) / factor[i]``
  with the file's frequency factors (``rope_freqs``, or Phi-3's long/short factors: short while
  the context is within ``rope.scaling.original_context_length``), ``scale`` = 1 / the linear
  scaling factor; the rotated dims are then multiplied by ``rope.scaling.attn_factor``.
* Attention: q, k, v from ``attn_q/k/v`` or fused ``attn_qkv`` (+ biases when present);
  per-head RMSNorm of q and k before RoPE (qwen3, gemma3); grouped-query, causal; scale
  ``1/sqrt(head_dim)`` (gemma3: ``query_pre_attn_scalar**-0.5``); gemma3's local layers see only
  the last ``sliding_window`` positions and use ``rope.freq_base_swa`` without position scaling.
* Block:     ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``; gemma3 norms each sublayer's
  output too (``post_attention_norm``, ``post_ffw_norm``) before adding it.
* MLP:       ``down(act(gate(x)) * up(x))``, act = SiLU (GELU, tanh form, for gemma3); Phi-3's
  ``ffn_up`` holds ``[gate; up]``.
* Embeddings ``× sqrt(hidden)`` for gemma3; output ``output.weight`` (+ ``output.bias``), or tied
  to ``token_embd.weight``; gemma's final soft-capping ``cap * tanh(logits / cap)``.

API::

    ref = ReferenceModel(path)
    ref.logits(tokens)                 # (T, vocab) float64, full causal pass
    cache = ref.new_cache()
    ref.forward(tokens, cache)         # (T, vocab); appends to the KV cache
    toks, gaps = ref.greedy(prompt, n) # n greedy tokens + top1-top2 logit gaps
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize

__all__ = ["ReferenceConfig", "ReferenceCache", "ReferenceModel", "load_config", "load_tensor",
           "apply_rope", "rope_inv_freq", "open_gguf", "blas_threads", "rms_norm", "silu", "softmax"]


class _FastGGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that slices a plain ndarray view of the file mapping
    instead of the ``np.memmap`` itself: same parse, ~3x faster on files with
    big tokenizer arrays (numpy's memmap subclass bookkeeping dominates)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        data = self.data
        if type(data) is not np.ndarray:
            self.data = data = data.view(np.ndarray)  # still backed by the mmap
        count = int(count)
        dt = np.dtype(dtype)
        arr = data[offset:offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def open_gguf(path) -> gguf.GGUFReader:
    try:
        return _FastGGUFReader(str(path))
    except Exception:  # private-API drift in a future gguf: fall back to the plain reader
        return gguf.GGUFReader(str(path))


_BLAS_FUNCS = None


def _find_blas_thread_funcs():
    """(get, set) num-threads functions of the OpenBLAS numpy loaded, or None."""
    global _BLAS_FUNCS
    if _BLAS_FUNCS is None:
        _BLAS_FUNCS = False
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
            for path in libs:
                lib = ctypes.CDLL(path)
                for suffix in ("64_", "_64_", ""):
                    for prefix in ("scipy_openblas", "openblas"):
                        get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                        set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                        if get is not None and set_ is not None:
                            get.restype, get.argtypes = ctypes.c_int, []
                            set_.restype, set_.argtypes = None, [ctypes.c_int]
                            _BLAS_FUNCS = (get, set_)
                            return _BLAS_FUNCS
        except Exception:  # not Linux, no OpenBLAS, ...: leave BLAS alone
            pass
    return _BLAS_FUNCS or None


@contextlib.contextmanager
def blas_threads(n):
    """Temporarily run OpenBLAS with ``n`` threads (best effort; no-op if unknown).

    The oracle's matmuls are mostly memory-bound mat-vecs; multi-threaded
    OpenBLAS on a busy 2-core machine spins and gets 5-20x slower."""
    funcs = _find_blas_thread_funcs() if n else None
    if not funcs:
        yield
        return
    get, set_ = funcs
    old = get()
    set_(int(n))
    try:
        yield
    finally:
        set_(old)


def _field_value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8")
    return v


@dataclass(frozen=True)
class ReferenceConfig:
    arch: str
    hidden: int
    n_layers: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dims: int
    rope_base: float
    rope_scale: float  # positions are divided by this (1.0 = no scaling)
    eps: float
    vocab: int
    context: int = 0
    neox: bool = False  # RoPE on halves instead of adjacent pairs
    attn_factor: float = 1.0  # rotated dims are multiplied by this
    sliding_window: int = 0
    local_layers: tuple = ()  # per layer: True where the sliding window applies
    rope_base_local: float = 10000.0
    query_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    softcap: float = 0.0
    original_context: int = 0  # for the long/short frequency factors


NEOX_ARCHS = ("qwen2", "qwen3", "phi3", "gemma3")


def load_config(reader: gguf.GGUFReader, vocab: int) -> ReferenceConfig:
    arch = _field_value(reader, "general.architecture", "llama")
    p = f"{arch}."

    def get(key, default=None):
        v = _field_value(reader, p + key, default)
        if v is None:
            raise KeyError(f"missing GGUF metadata key {p + key!r}")
        return v

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv_heads = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    n_layers = int(get("block_count"))
    scaling_type = _field_value(reader, p + "rope.scaling.type")
    factor = float(get("rope.scaling.factor", 0.0))
    rope_scale = 1.0
    if scaling_type in (None, "linear") and factor:
        rope_scale = factor
    elif scaling_type not in (None, "none", "linear", "longrope"):
        raise NotImplementedError(f"rope scaling type {scaling_type!r} not supported by the reference")
    extra = {}
    if arch == "gemma3":
        # query_pre_attn_scalar: head_dim, or hidden / heads for the 27B model (62 layers)
        extra["query_scale"] = (hidden / n_heads if n_layers == 62 else head_dim) ** -0.5
        extra["softcap"] = float(get("final_logit_softcapping", 0.0))
        window = int(get("attention.sliding_window", 0))
        if window > 0:
            pattern = get("attention.sliding_window_pattern", 6)
            local = (tuple(bool(v) for v in pattern) if isinstance(pattern, list)
                     else tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)))
            extra |= dict(sliding_window=window, local_layers=local,
                          rope_base_local=float(get("rope.freq_base_swa", 10000.0)))
    context = int(get("context_length"))
    return ReferenceConfig(
        arch=arch,
        hidden=hidden,
        n_layers=n_layers,
        ffn=int(get("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_dims=int(get("rope.dimension_count", head_dim)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scale=rope_scale,
        eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab=vocab,
        context=context,
        neox=arch in NEOX_ARCHS,
        attn_factor=float(get("rope.scaling.attn_factor", 1.0)),
        original_context=int(get("rope.scaling.original_context_length", context)),
        **extra,
    )


def load_tensor(t) -> np.ndarray:
    """Dequantize a ``ReaderTensor`` in numpy order (reversed GGUF shape).

    gguf's values are float32 (exact: every weight type decodes to at most 24 significant
    bits), kept so to halve the oracle's memory; every product with them is taken in float64."""
    data = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(data, dtype=np.float32).reshape(shape)


@dataclass
class ReferenceCache:
    """Per-layer keys (post-RoPE) and values, each (n_kv_heads, T, head_dim)."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    offset: int = 0  # number of positions already processed


def _f64(w: np.ndarray) -> np.ndarray:
    """A stored float32 weight in float64 for a product (numpy's mixed-type matmul skips BLAS)."""
    return w.astype(np.float64)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_inv_freq(rope_dims: int, base: float, factors: np.ndarray | None = None) -> np.ndarray:
    """base^(-2i/rope_dims) for i < rope_dims/2, divided by the frequency factors if given."""
    i = np.arange(rope_dims // 2, dtype=np.float64)
    inv = base ** (-2.0 * i / rope_dims)
    return inv if factors is None else inv / np.asarray(factors, dtype=np.float64)


def apply_rope(x: np.ndarray, positions, inv_freq: np.ndarray, rope_dims: int, scale: float = 1.0,
               neox: bool = False, attn_factor: float = 1.0) -> np.ndarray:
    """llama.cpp's RoPE on the last axis of ``x`` (..., T, head_dim).

    Pair i (``i < rope_dims/2``) is ``(x[2i], x[2i+1])`` ("normal" mode) or ``(x[i], x[i +
    rope_dims/2])`` (NEOX), rotated by ``(pos / scale) * inv_freq[i]``; the rotated dims are then
    multiplied by ``attn_factor``; dims ``>= rope_dims`` pass through.
    """
    ang = (np.asarray(positions, dtype=np.float64) / scale)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = np.cos(ang) * attn_factor, np.sin(ang) * attn_factor
    out = np.array(x, dtype=np.float64, copy=True)
    half = rope_dims // 2
    first = (slice(0, half) if neox else slice(0, rope_dims, 2))
    second = (slice(half, rope_dims) if neox else slice(1, rope_dims, 2))
    x0, x1 = out[..., first].copy(), out[..., second].copy()
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class ReferenceModel:
    def __init__(self, path):
        self.path = Path(path)
        reader = open_gguf(self.path)
        tensors = {t.name: t for t in reader.tensors}
        #: GGUF storage type name of every tensor, e.g. {"blk.0.attn_q.weight": "Q4_1"}
        self.tensor_types = {n: t.tensor_type.name for n, t in tensors.items()}

        self.tok_embd = load_tensor(tensors["token_embd.weight"])  # (vocab, hidden)
        self.cfg = load_config(reader, vocab=self.tok_embd.shape[0])
        c = self.cfg
        assert self.tok_embd.shape[1] == c.hidden
        assert c.n_heads % c.n_kv_heads == 0
        assert c.rope_dims % 2 == 0 and c.rope_dims <= c.head_dim

        self.output_norm = load_tensor(tensors["output_norm.weight"])
        self.tied = "output.weight" not in tensors
        self.output = self.tok_embd if self.tied else load_tensor(tensors["output.weight"])
        self.output_bias = load_tensor(tensors["output.bias"]) if "output.bias" in tensors else None

        # every tensor of layer i, by its name without "blk.i.": {"attn_q.weight": ..., "attn_q.bias": ...}
        self.layers = []
        for i in range(c.n_layers):
            prefix = f"blk.{i}."
            self.layers.append({n[len(prefix):]: load_tensor(t) for n, t in tensors.items() if n.startswith(prefix)})
        unknown = set(tensors) - {"token_embd.weight", "output_norm.weight", "output.weight", "output.bias",
                                  "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
        unknown -= {n for n in tensors if n.startswith("blk.")}
        assert not unknown, f"the reference does not know {sorted(unknown)}"

        factors = None
        if "rope_freqs.weight" in tensors:
            factors = load_tensor(tensors["rope_freqs.weight"])
        elif "rope_factors_long.weight" in tensors:
            long = c.context > c.original_context
            factors = load_tensor(tensors["rope_factors_long.weight" if long else "rope_factors_short.weight"])
        self.inv_freq = rope_inv_freq(c.rope_dims, c.rope_base, factors)
        self.inv_freq_local = rope_inv_freq(c.rope_dims, c.rope_base_local, factors)
        del reader

    # ------------------------------------------------------------------ math
    def is_local(self, layer: int) -> bool:
        return bool(self.cfg.sliding_window) and self.cfg.local_layers[layer]

    def rope(self, x: np.ndarray, positions, layer: int = 0) -> np.ndarray:
        """x: (heads, T, head_dim) at absolute ``positions`` (T,)."""
        c = self.cfg
        if self.is_local(layer):  # local layers: their own base, no position scaling
            return apply_rope(x, positions, self.inv_freq_local, c.rope_dims, 1.0, c.neox, c.attn_factor)
        return apply_rope(x, positions, self.inv_freq, c.rope_dims, c.rope_scale, c.neox, c.attn_factor)

    def new_cache(self) -> ReferenceCache:
        n = self.cfg.n_layers
        shape = (self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        return ReferenceCache(keys=[np.zeros(shape) for _ in range(n)],
                              values=[np.zeros(shape) for _ in range(n)], offset=0)

    #: OpenBLAS threads used inside forward() (None: leave the process setting);
    #: env REFERENCE_BLAS_THREADS overrides.
    blas_threads = int(os.environ.get("REFERENCE_BLAS_THREADS", "1")) or None

    def forward(self, tokens, cache: ReferenceCache) -> np.ndarray:
        """Run ``tokens`` at positions ``cache.offset ...``; returns (T, vocab) float64 logits."""
        with blas_threads(self.blas_threads):
            return self._forward(tokens, cache)

    def _forward(self, tokens, cache: ReferenceCache) -> np.ndarray:
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            return np.zeros((0, c.vocab))
        positions = np.arange(cache.offset, cache.offset + T)
        x = self.tok_embd[tokens].astype(np.float64)  # (T, hidden)
        if c.arch == "gemma3":
            x = x * np.float64(np.sqrt(np.float32(c.hidden)))  # llama.cpp: sqrtf(n_embd)
        for li, L in enumerate(self.layers):
            a = self._attention(li, L, rms_norm(x, L["attn_norm.weight"], c.eps), positions, cache)
            x = x + (rms_norm(a, L["post_attention_norm.weight"], c.eps) if "post_attention_norm.weight" in L else a)
            m = self._mlp(L, rms_norm(x, L["ffn_norm.weight"], c.eps))
            x = x + (rms_norm(m, L["post_ffw_norm.weight"], c.eps) if "post_ffw_norm.weight" in L else m)
        cache.offset += T
        x = rms_norm(x, self.output_norm, c.eps)
        logits = x @ _f64(self.output).T
        if self.output_bias is not None:
            logits = logits + self.output_bias
        if c.softcap:
            logits = c.softcap * np.tanh(logits / c.softcap)
        return logits

    def _attention(self, li: int, L: dict, h: np.ndarray, positions, cache: ReferenceCache) -> np.ndarray:
        c = self.cfg
        T, S = h.shape[0], positions[-1] + 1  # S: key length after this call
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if "attn_qkv.weight" in L:
            qkv = _linear(h, L, "attn_qkv")
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
        else:
            q, k, v = _linear(h, L, "attn_q"), _linear(h, L, "attn_k"), _linear(h, L, "attn_v")
        q = q.reshape(T, c.n_heads, c.head_dim).transpose(1, 0, 2)
        k = k.reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = v.reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        if "attn_q_norm.weight" in L:  # per head, over head_dim
            q, k = rms_norm(q, L["attn_q_norm.weight"], c.eps), rms_norm(k, L["attn_k_norm.weight"], c.eps)
        q, k = self.rope(q, positions, li), self.rope(k, positions, li)
        K = np.concatenate([cache.keys[li], k], axis=1)    # (n_kv, S, hd)
        V = np.concatenate([cache.values[li], v], axis=1)
        cache.keys[li], cache.values[li] = K, V
        # query at position p sees keys 0..p, or only p - window < key <= p on local layers
        keys = np.arange(S)[None, :]
        masked = keys > positions[:, None]
        if self.is_local(li):
            masked |= keys <= positions[:, None] - c.sliding_window
        group, scale = c.n_heads // c.n_kv_heads, c.query_scale or 1.0 / math.sqrt(c.head_dim)
        out = np.empty((c.n_heads, T, c.head_dim))
        for hq in range(c.n_heads):
            s = np.where(masked, -np.inf, (q[hq] @ K[hq // group].T) * scale)  # (T, S)
            out[hq] = softmax(s, axis=-1) @ V[hq // group]
        return _linear(out.transpose(1, 0, 2).reshape(T, q_dim), L, "attn_output")

    def _mlp(self, L: dict, h: np.ndarray) -> np.ndarray:
        act = gelu_tanh if self.cfg.arch == "gemma3" else silu
        if "ffn_gate.weight" in L:
            gate, up = _linear(h, L, "ffn_gate"), _linear(h, L, "ffn_up")
        else:  # Phi-3: ffn_up holds [gate; up]
            gate, up = np.split(_linear(h, L, "ffn_up"), 2, axis=-1)
        return _linear(act(gate) * up, L, "ffn_down")

    def logits(self, tokens) -> np.ndarray:
        """Full causal pass over ``tokens`` from position 0: (T, vocab) float64."""
        return self.forward(tokens, self.new_cache())

    def greedy(self, prompt_tokens, n: int):
        """Greedy-decode ``n`` tokens after ``prompt_tokens`` (no EOS stopping).

        Returns ``(tokens, gaps)``: the ``n`` generated token ids (prompt not
        included) and, for each step, the top1 - top2 logit gap of the
        distribution the token was chosen from (ties: lowest id wins).
        """
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise ValueError("greedy() needs at least one prompt token")
        cache = self.new_cache()
        last = self.forward(prompt, cache)[-1]
        out, gaps = [], []
        for step in range(n):
            top2 = np.partition(last, -2)[-2:]
            tok = int(np.argmax(last))
            out.append(tok)
            gaps.append(float(top2[1] - top2[0]))
            if step + 1 < n:
                last = self.forward([tok], cache)[-1]
        return out, gaps


def _linear(h: np.ndarray, L: dict, name: str) -> np.ndarray:
    """h @ W.T (+ bias when the file has one)."""
    y = h @ _f64(L[name + ".weight"]).T
    return y + L[name + ".bias"] if name + ".bias" in L else y
