"""Exact float64 NumPy reference ("oracle") for Llama-family GGUF models.

This module is deliberately independent of ``mlx_llama``: it reads the GGUF
with ``gguf.GGUFReader``, dequantizes every tensor with
``gguf.quants.dequantize`` and runs a plainly written Llama-2 forward pass in
float64, following llama.cpp's conventions:

* RMSNorm:   ``x / sqrt(mean(x**2) + eps) * w``
* RoPE:      GGUF / llama.cpp "normal" mode. llama.cpp's converter permutes the
  Q/K weights so that the rotated pairs are *adjacent*: ``(x[2i], x[2i+1])`` is
  rotated by ``pos * base**(-2i / rope_dims)`` for ``i < rope_dims / 2``; dims
  beyond ``rope_dims`` are left untouched.  Linear rope scaling
  (``{arch}.rope.scaling.type == "linear"``) divides positions by the factor.
* Attention: grouped-query, causal, scale ``1/sqrt(head_dim)``; query head ``h``
  uses kv head ``h // (n_heads // n_kv_heads)``.
* MLP:       SwiGLU ``down(silu(gate(x)) * up(x))``.
* Output:    ``output.weight``, or tied to ``token_embd.weight`` if absent.

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
    rope_dims = int(get("rope.dimension_count", head_dim))
    rope_base = float(get("rope.freq_base", 10000.0))
    scaling_type = _field_value(reader, p + "rope.scaling.type")
    rope_scale = 1.0
    if scaling_type == "linear":
        rope_scale = float(get("rope.scaling.factor", 1.0))
    elif scaling_type not in (None, "none"):
        raise NotImplementedError(f"rope scaling type {scaling_type!r} not supported by the reference")
    return ReferenceConfig(
        arch=arch,
        hidden=hidden,
        n_layers=int(get("block_count")),
        ffn=int(get("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_dims=rope_dims,
        rope_base=rope_base,
        rope_scale=rope_scale,
        eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab=vocab,
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


def rope_inv_freq(rope_dims: int, base: float) -> np.ndarray:
    """base^(-2i/rope_dims) for i < rope_dims/2."""
    i = np.arange(rope_dims // 2, dtype=np.float64)
    return base ** (-2.0 * i / rope_dims)


def apply_rope(x: np.ndarray, positions, inv_freq: np.ndarray, rope_dims: int, scale: float = 1.0) -> np.ndarray:
    """llama.cpp "normal" RoPE on the last axis of ``x`` (..., T, head_dim).

    Adjacent pairs ``(x[2i], x[2i+1])``, ``i < rope_dims/2``, are rotated by
    ``(pos / scale) * inv_freq[i]``; dims ``>= rope_dims`` pass through.
    """
    ang = (np.asarray(positions, dtype=np.float64) / scale)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = np.cos(ang), np.sin(ang)
    out = np.array(x, dtype=np.float64, copy=True)
    x0 = out[..., 0:rope_dims:2].copy()
    x1 = out[..., 1:rope_dims:2].copy()
    out[..., 0:rope_dims:2] = x0 * cos - x1 * sin
    out[..., 1:rope_dims:2] = x0 * sin + x1 * cos
    return out


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

        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        self.layers = []
        for i in range(c.n_layers):
            self.layers.append({n: load_tensor(tensors[f"blk.{i}.{n}.weight"]) for n in names})
        L = self.layers[0]
        assert L["attn_q"].shape == (c.n_heads * c.head_dim, c.hidden)
        assert L["attn_k"].shape == (c.n_kv_heads * c.head_dim, c.hidden)
        assert L["ffn_gate"].shape == (c.ffn, c.hidden)
        assert L["ffn_down"].shape == (c.hidden, c.ffn)

        self.inv_freq = rope_inv_freq(c.rope_dims, c.rope_base)
        del reader

    # ------------------------------------------------------------------ math
    def rope(self, x: np.ndarray, positions) -> np.ndarray:
        """x: (heads, T, head_dim) at absolute ``positions`` (T,)."""
        return apply_rope(x, positions, self.inv_freq, self.cfg.rope_dims, self.cfg.rope_scale)

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
        start = cache.offset
        positions = np.arange(start, start + T)
        S = start + T  # total key length after this call
        # causal mask: query at absolute position start+t sees keys 0..start+t
        mask = np.arange(S)[None, :] > positions[:, None]  # (T, S) True = masked
        group = c.n_heads // c.n_kv_heads
        scale = 1.0 / math.sqrt(c.head_dim)

        x = self.tok_embd[tokens].astype(np.float64)  # (T, hidden)
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], c.eps)
            q = (h @ _f64(L["attn_q"]).T).reshape(T, c.n_heads, c.head_dim).transpose(1, 0, 2)
            k = (h @ _f64(L["attn_k"]).T).reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
            v = (h @ _f64(L["attn_v"]).T).reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
            K = np.concatenate([cache.keys[li], k], axis=1)    # (n_kv, S, hd)
            V = np.concatenate([cache.values[li], v], axis=1)
            cache.keys[li], cache.values[li] = K, V

            attn = np.empty((c.n_heads, T, c.head_dim))
            for hq in range(c.n_heads):
                kv = hq // group
                s = (q[hq] @ K[kv].T) * scale  # (T, S)
                s = np.where(mask, -np.inf, s)
                attn[hq] = softmax(s, axis=-1) @ V[kv]
            attn = attn.transpose(1, 0, 2).reshape(T, c.n_heads * c.head_dim)
            x = x + attn @ _f64(L["attn_output"]).T

            h = rms_norm(x, L["ffn_norm"], c.eps)
            g = h @ _f64(L["ffn_gate"]).T
            u = h @ _f64(L["ffn_up"]).T
            x = x + (silu(g) * u) @ _f64(L["ffn_down"]).T

        cache.offset = S
        x = rms_norm(x, self.output_norm, c.eps)
        return x @ _f64(self.output).T

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
