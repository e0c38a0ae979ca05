"""One decoder-only transformer as `mlx.nn` modules; the architecture's differences are data
(`architectures.ModelConfig` and its `Arch` row): RoPE style and factors, q/k norms, biases,
fused projections, norm placement, activation, embedding scale, sliding windows, soft-capping.

Module attribute names are the GGUF tensor names (`blk.N.attn_q`, `ffn_gate`, `output_norm` …),
with a block's attention and feed-forward layers grouped under `attn` and `ffn`; `module_path`
maps a GGUF tensor name onto this tree.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import cuda_attention, cuda_embed, cuda_norm, kernels
from .architectures import ModelConfig
from .cache import KVCache
from .layers import (BlockLinear, Embedding, Linear, block_layer, deferred, fused_kernels, gated_product,
                     gated_rows_product, mark_symmetric, resolve)

BLOCK_LEVEL = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")  # norms that sit in the block itself


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at a dotted module path ('blk.3.attn.attn_v', 'output')."""
    *parents, last = path.split(".")
    node = model
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = module


def module_path(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' → 'blk.3.attn.attn_q.weight'; 'blk.3.ffn_up.bias' → 'blk.3.ffn.ffn_up.bias'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] not in BLOCK_LEVEL:
        parts.insert(2, parts[2].split("_")[0])  # attn_q → attn, ffn_up → ffn
    return ".".join(parts)


class Vector(nn.Module):
    """A tensor the model reads as a whole (RoPE frequency factors), under `.weight`."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = mx.ones((n,))


class RoPE(nn.Module):
    """Rotary position embedding of the first `dims` dimensions of each head.

    traditional: adjacent pairs (as llama.cpp's converter permutes `llama` files), else the NEOX
    halves. factors: frequency factors f_i (angle_i = position · scale · base^(−2i/dims) / f_i),
    read when first used (they are loaded after the modules are made). attn_factor multiplies the
    rotated dimensions (llama.cpp's long-context `rope.scaling.attn_factor`)."""

    def __init__(self, dims: int, head_dim: int, traditional: bool, base: float, scale: float,
                 factors: Vector | None = None, attn_factor: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.base, self.scale = dims, traditional, base, scale
        self._factors, self._freqs = factors, None  # private: not parameters of this module
        self._mscale = None
        if attn_factor != 1.0:  # (head_dim,): attn_factor on the rotated dims, 1 on the rest
            self._mscale = mx.array([attn_factor] * dims + [1.0] * (head_dim - dims), mx.float32)

    def frequencies(self) -> mx.array | None:
        """MLX's freqs: the periods base^(2i/dims), here times f_i (None without factors); made
        once, after the factors are loaded (`decode_step` asks before it traces a step)."""
        if self._factors is not None and self._freqs is None:
            periods = self.base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)
            self._freqs = periods * self._factors.weight.astype(mx.float32)
            mx.eval(self._freqs)
        return self._freqs

    def kernel_form(self) -> tuple | None:
        """(traditional, dims, scale, base, freqs or None) for a kernel that applies this RoPE as
        MLX's does (`cuda_attention`); None where it cannot (an attn_factor)."""
        if self._mscale is not None:
            return None
        return self.traditional, self.dims, self.scale, self.base, self.frequencies()

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        if self._factors is None:
            y = mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)
        else:
            y = mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=self.scale, offset=offset,
                             freqs=self.frequencies())
        return y if self._mscale is None else y * self._mscale.astype(y.dtype)


def heads(a: mx.array, n: int, B: int, T: int) -> mx.array:
    """(B, T, n · head_dim) → (B, n, T, head_dim); for one token a reshape (no transpose op)."""
    return a.reshape(B, n, 1, -1) if T == 1 else a.reshape(B, T, n, -1).transpose(0, 2, 1, 3)


# The gated activations as one fused kernel each (elsewhere than the CPU, where `kernels` has its own)
_swiglu = mx.compile(lambda gate, up: nn.silu(gate) * up)
_geglu = mx.compile(lambda gate, up: nn.gelu_approx(gate) * up)


def linear(cfg: ModelConfig, name: str, n_in: int, n_out: int) -> nn.Linear:
    return Linear(n_in, n_out, bias=name in cfg.biases)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, cpu_kernels: bool, factors: Vector | None):
        super().__init__()
        self.cpu_kernels = cpu_kernels
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_dim, self.kv_dim = cfg.q_dim, cfg.kv_dim
        self.scale = cfg.query_scale
        d = cfg.hidden_size
        if cfg.fused_qkv:
            self.attn_qkv = linear(cfg, "attn_qkv", d, cfg.q_dim + 2 * cfg.kv_dim)
        elif cfg.fused_qk:
            self.attn_qk = linear(cfg, "attn_qk", d, cfg.q_dim + cfg.kv_dim)
            self.attn_v = linear(cfg, "attn_v", d, cfg.kv_dim)
        else:
            self.attn_q = linear(cfg, "attn_q", d, cfg.q_dim)
            self.attn_k = linear(cfg, "attn_k", d, cfg.kv_dim)
            self.attn_v = linear(cfg, "attn_v", d, cfg.kv_dim)
        self.attn_output = linear(cfg, "attn_output", cfg.q_dim, d)
        if cfg.arch.qk_norm:
            self.attn_q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
            self.attn_k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        # local (sliding-window) layers: their own RoPE base, no position scaling
        local = cfg.is_local(layer)
        self.window = cfg.sliding_window if local else 0
        self.rope = RoPE(cfg.rope_dims, cfg.head_dim, not cfg.arch.rope_neox,
                         cfg.rope_theta_swa if local else cfg.rope_theta, 1.0 if local else cfg.rope_scale,
                         factors, cfg.rope_attn_factor)

    def projections(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        if "attn_qkv" in self:
            qkv = self.attn_qkv(x)
            return qkv[..., : self.q_dim], qkv[..., self.q_dim : self.q_dim + self.kv_dim], qkv[..., self.q_dim + self.kv_dim :]
        if "attn_qk" in self:
            qk = self.attn_qk(x)
            return qk[..., : self.q_dim], qk[..., self.q_dim :], self.attn_v(x)
        return self.attn_q(x), self.attn_k(x), self.attn_v(x)

    def __call__(self, x: mx.array, cache: KVCache | list[KVCache | None] | None) -> mx.array:
        B, T, _ = x.shape
        if T == 1 and hasattr(cache, "attention_mask") and cuda_attention.serves(B, self.head_dim, cache.kv.shape[2]):
            return deferred(self.attn_output, self.kernel_attention(x, cache).reshape(B, 1, self.q_dim))  # -1: a primitive
        q, k, v = self.projections(x)
        q, k, v = heads(q, self.n_heads, B, T), heads(k, self.n_kv_heads, B, T), heads(v, self.n_kv_heads, B, T)
        if "attn_q_norm" in self:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        if isinstance(cache, list):
            # batched decoding: one cache per row, each sequence at its own position; the
            # projections above ran on all rows at once, attention runs row by row (a row
            # whose cache is None is padding: zeros)
            out = mx.concatenate([self.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], c, T) if c is not None
                                  else mx.zeros_like(q[i : i + 1]) for i, c in enumerate(cache)])
        else:
            out = self.attend(q, k, v, cache, T)
        # (B, heads, T, head_dim) → (B, T, heads · head_dim); for one token a reshape
        out = out.reshape(B, 1, -1) if T == 1 else out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return deferred(self.attn_output, out)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None, T: int) -> mx.array:
        """RoPE at the cache's position, the cache updated, attention: (B, heads, T, head_dim)."""
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "attention_mask"):  # a compiled decode step's cache: the whole buffer, masked
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=cache.attention_mask(self.window))
        if self.cpu_kernels:
            return kernels.attention(q, k, v, self.scale, self.window)
        return self.gpu_attention(q, k, v, T)

    def kernel_attention(self, x: mx.array, slot) -> mx.array:
        """One token's attention in a compiled step by `cuda_attention`'s kernel, RoPE in it where
        `kernel_form` allows (the fused q/k/v output then goes in as it is); the kernel writes the new
        key and value into the slot's buffer itself ("inplace"), or returns them for the step to
        write → (1, 1, heads · head_dim)."""
        rope = self.rope.kernel_form() if fused_kernels("rope") else None
        if rope is not None and "attn_q_norm" not in self:  # the projections flat, as the kernel reads them
            if "attn_qkv" in self:
                q = k = v = self.attn_qkv(x)
                offsets = (0, self.q_dim, self.q_dim + self.kv_dim)
            elif "attn_qk" in self:
                q = k = self.attn_qk(x)
                v = self.attn_v(x)
                offsets = (0, self.q_dim, 0)
            else:
                q, k, v = self.projections(x)
                offsets = (0, 0, 0)
        else:
            q, k, v = self.projections(x)
            q, k = heads(q, self.n_heads, 1, 1), heads(k, self.n_kv_heads, 1, 1)
            if "attn_q_norm" in self:
                q, k = self.attn_q_norm(q), self.attn_k_norm(k)
            if rope is None:
                q, k = self.rope(q, slot.offset), self.rope(k, slot.offset)
            offsets = (0, 0, 0)
        in_place = fused_kernels("inplace")
        out, kv_new = cuda_attention.decode_attention(q, k, v, slot.kv, slot.offset, self.scale, heads=self.n_heads,
                                                      window=self.window, rope=rope, offsets=offsets, in_place=in_place)
        if not in_place:  # else the kernel wrote them into the buffer itself
            slot.write(kv_new)
        return out

    def gpu_attention(self, q: mx.array, k: mx.array, v: mx.array, T: int) -> mx.array:
        if self.window and T == 1:
            k, v = k[..., -self.window :, :], v[..., -self.window :, :]
        if self.window and T > 1:
            mask = kernels.causal_mask(T, k.shape[2], self.window)
        else:  # "causal" aligns the last query with the last key, so it holds after a cached prefix
            mask = "causal" if T > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, cpu_kernels: bool):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        gelu = cfg.arch.activation == "gelu_tanh"
        self.activation = "gelu_tanh" if gelu else "silu"
        if cpu_kernels:
            self.glu = kernels.geglu if gelu else kernels.swiglu
        else:
            self.glu = _geglu if gelu else _swiglu
        self.fused, self.interleaved = cfg.fused_gate_up, cfg.gate_up_interleaved
        if not self.fused:
            self.ffn_gate = linear(cfg, "ffn_gate", d, f)
        self.ffn_up = linear(cfg, "ffn_up", d, 2 * f if self.fused else f)
        self.ffn_down = linear(cfg, "ffn_down", f, d)

    def __call__(self, x: mx.array) -> mx.array:
        if self.interleaved:  # ffn_up's rows alternate gate, up
            y = gated_rows_product(self.ffn_up, x, self.activation)  # the activation as the products are written
            if y is None:
                a = self.ffn_up(x)
                y = self.glu(a[..., 0::2], a[..., 1::2])
            return deferred(self.ffn_down, y)
        if self.fused:  # ffn_up holds [gate; up]
            a = self.ffn_up(x)
            y = gated_product(self.ffn_down, a, self.activation)  # the activation inside the down projection
            if y is not None:
                return y
            gate, up = mx.split(a, 2, axis=-1)
        else:
            gate, up = self.ffn_gate(x), self.ffn_up(x)
        return deferred(self.ffn_down, self.glu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, cpu_kernels: bool, factors: Vector | None):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.attn = Attention(cfg, layer, cpu_kernels, factors)
        self.ffn_norm = nn.RMSNorm(d, eps=eps)
        self.ffn = FeedForward(cfg, cpu_kernels)
        if cfg.arch.sandwich_norms:
            self.post_attention_norm = nn.RMSNorm(d, eps=eps)
            self.post_ffw_norm = nn.RMSNorm(d, eps=eps)

    def __call__(self, x: mx.array, cache: KVCache | None) -> mx.array:
        h, delta = self.residual(x, None, cache)
        return h + resolve(delta)

    def residual(self, x: mx.array, delta: mx.array | None, cache: KVCache | None) -> tuple[mx.array, mx.array]:
        """The block on the residual stream x + delta (the last block's feed-forward output not yet
        added) → (its stream before its own feed-forward output, that output): each add is done with
        the norm after it (`cuda_norm.add_norm`: one kernel on NVIDIA GPUs, or with the output
        projection before it, the sublayers' outputs being `layers.deferred` products)."""
        x, a = cuda_norm.add_norm(x, delta, self.attn_norm)
        out = self.attn(a, cache)
        if "post_attention_norm" in self:  # sandwich: each sublayer's output normed before the residual
            out = self.post_attention_norm(resolve(out))
        h, b = cuda_norm.add_norm(x, out, self.ffn_norm)
        out = self.ffn(b)
        return h, self.post_ffw_norm(resolve(out)) if "post_ffw_norm" in self else out


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: mx.Dtype = mx.float32, cpu_kernels: bool = False):
        """cpu_kernels: attention and gated activations from `kernels` (fast on MLX's CPU
        backend, float32 only)."""
        super().__init__()
        self.config = cfg
        self.dtype = dtype  # of the activations
        self.token_embd = Embedding(cfg.vocab_size, cfg.hidden_size)
        factors = None
        if cfg.rope_factors != "none":
            factors = self[cfg.rope_factors] = Vector(cfg.rope_dims // 2)
        self.blk = [Block(cfg, i, cpu_kernels, factors) for i in range(cfg.num_layers)]
        self.output_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.tied_embeddings = cfg.tied_embeddings
        if not cfg.tied_embeddings:
            self.output = linear(cfg, "output", cfg.hidden_size, cfg.vocab_size)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.arch.embed_scale else 0.0
        self.softcap = cfg.final_logit_softcap

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """tokens: (B, T) int → logits (B, T, vocab). cache: one KVCache per layer, shared by the B
        rows; or, per layer, a list of B caches (None for a padding row): rows at different
        positions, as `batch.Batch` decodes them."""
        return self.logits(self.hidden(tokens, cache))

    def hidden(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """tokens: (B, T) int → final hidden states (B, T, hidden), before the output norm."""
        h, delta = self.embed(tokens), None
        for i, block in enumerate(self.blk):
            h, delta = block.residual(h, delta, cache[i] if cache is not None else None)
        return h + resolve(delta)

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens: (B, T) int → the first block's input (B, T, hidden), in the activation dtype."""
        if cuda_embed.serves(self.token_embd, tokens):  # one kernel (NVIDIA GPUs), the same numbers
            return cuda_embed.lookup(self.token_embd, tokens, self.embed_scale, self.dtype)
        h = self.token_embd(tokens)
        if self.embed_scale:
            h = h * self.embed_scale
        return h.astype(self.dtype)

    def logits(self, h: mx.array) -> mx.array:
        h = self.output_norm(h)
        out = self.token_embd.as_linear(h) if self.tied_embeddings else self.output(h)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blk]


def build_model(
    cfg: ModelConfig,
    weights: list[tuple[str, mx.array]],
    *,
    dtype: mx.Dtype,
    quantized: dict[str, dict] | None = None,
    blocks: dict[str, int] | None = None,
    cpu_dequantized: bool = False,
) -> Model:
    """The model from its arrays, named by module path — from a GGUF file or a converted directory.

    quantized: module path → {"group_size", "bits"} of the layers kept in MLX's affine form (their
    `.weight`, `.scales` and `.biases` are in `weights`); blocks: module path → GGML type of the
    Q2_K/Q6_K layers kept as the file's blocks (their fields are `path.<field>` in `weights`).
    """
    model = Model(cfg, dtype=dtype, cpu_kernels=uses_cpu_kernels(dtype))
    fill_model(model, weights, quantized=quantized, blocks=blocks)
    model.cpu_dequantized = cpu_dequantized
    mark_symmetric(model)  # the CUDA matvec's form for Q4_0/Q5_0/Q8_0 layers
    return model


def uses_cpu_kernels(dtype: mx.Dtype) -> bool:
    """Whether the model runs `kernels`' attention and activations (MLX's CPU backend, float32)."""
    return mx.default_device() == mx.cpu and dtype == mx.float32


def fill_model(model: nn.Module, weights: list[tuple[str, mx.array]], *, quantized: dict[str, dict] | None = None,
               blocks: dict[str, int] | None = None) -> None:
    """Give a model (or any module tree named the same way) its arrays: the layers that stay
    quantized or in blocks become those layers first; every parameter must be in `weights`."""
    for path, ggml_type in (blocks or {}).items():
        prefix = path + "."
        set_module(model, path, block_layer(path, ggml_type, {k[len(prefix):]: v for k, v in weights if k.startswith(prefix)}))
    if quantized:
        nn.quantize(model, class_predicate=lambda p, m: quantized.get(p, False))
    model.load_weights(weights, strict=True)
    model.eval()


__all__ = ["Model", "build_model", "fill_model", "module_path", "set_module", "uses_cpu_kernels", "BlockLinear"]
