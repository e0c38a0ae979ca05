"""The Llama-2 architecture as `mlx.nn` modules.

Module attribute names are the GGUF tensor names (`blk.N.attn_q`, `ffn_gate`, `output_norm` …),
with a block's attention and feed-forward layers grouped under `attn` and `ffn`; `module_path`
maps a GGUF tensor name onto this tree.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cuda_kernels, kernels
from .cache import KVCache
from .gguf_file import ModelConfig
from .quants import dequantize_blocks


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """Looks rows up in float32: MLX's own layer computes them in the float16 of the scales,
    which would round every embedding value the GGUF file holds exactly."""

    def __call__(self, x: mx.array) -> mx.array:
        scales, biases = self["scales"][x].astype(mx.float32), self["biases"][x].astype(mx.float32)
        return mx.dequantize(self["weight"][x], scales, biases, group_size=self.group_size, bits=self.bits)


class Embedding(nn.Embedding):
    def to_quantized(self, group_size=None, bits=None, mode="affine", **kwargs):
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class BlockLinear(nn.Module):
    """A linear layer (no bias) whose weight stays in the GGUF file's Q2_K/Q6_K blocks (see
    `quants.Blocks`): dequantized exactly, in the input's dtype, each time it runs."""

    def __init__(self, ggml_type: int, fields: dict[str, mx.array]):
        super().__init__()
        self.ggml_type = ggml_type
        for name, value in fields.items():
            self[name] = value

    def fields(self, rows: mx.array | None = None, after: mx.array | None = None) -> dict[str, mx.array]:
        """The block fields (or the rows `rows` of them); with `after`, usable only once `after`
        is computed: MLX would otherwise schedule every layer's (input-independent)
        dequantization at the start of a forward pass and hold all the dense weights at once."""
        names = [k for k, v in self.items() if isinstance(v, mx.array)]
        arrays = [self[k] if rows is None else self[k][rows] for k in names]
        if after is not None:
            arrays = mx.depends(arrays, [after])
        return dict(zip(names, arrays))

    def __call__(self, x: mx.array) -> mx.array:
        if not cuda_kernels.available():
            return x @ dequantize_blocks(self.ggml_type, self.fields(after=x), x.dtype).T
        if x.size // x.shape[-1] <= cuda_kernels.MATVEC_MAX_ROWS:  # decoding: read only the blocks
            return cuda_kernels.block_matvec(x, self.ggml_type, self.fields())
        return x @ cuda_kernels.dequantize(self.ggml_type, self.fields(after=x), x.dtype).T


class BlockEmbedding(BlockLinear):
    """An embedding table in Q2_K/Q6_K blocks: a lookup dequantizes only the rows it picks."""

    def __call__(self, ids: mx.array) -> mx.array:
        return dequantize_blocks(self.ggml_type, self.fields(rows=ids), mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return super().__call__(x)


def block_layer(path: str, ggml_type: int, fields: dict[str, mx.array]) -> BlockLinear:
    """The layer for Q2_K/Q6_K blocks at module `path`: the embedding table or a linear layer."""
    return (BlockEmbedding if path == "token_embd" else BlockLinear)(ggml_type, fields)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at a dotted module path ('blk.3.attn.attn_v', 'output')."""
    *parents, last = path.split(".")
    node = model
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = module


def module_path(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' → 'blk.3.attn.attn_q.weight'; 'blk.3.ffn_up.weight' → 'blk.3.ffn.ffn_up.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        group = parts[2].split("_")[0]  # attn_q → attn, ffn_up → ffn
        if parts[2] not in ("attn_norm", "ffn_norm"):
            parts.insert(2, group)
    return ".".join(parts)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, cpu_kernels: bool):
        super().__init__()
        self.cpu_kernels = cpu_kernels
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_q = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.attn_k = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.attn_v = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.attn_output = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        # llama.cpp's converter permuted Q/K so each rotated pair is adjacent: "traditional" RoPE.
        self.rope = nn.RoPE(cfg.rope_dims, traditional=True, base=cfg.rope_theta, scale=cfg.rope_scale)

    def __call__(self, x: mx.array, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        # (B, T, heads * head_dim) → (B, heads, T, head_dim)
        q = self.attn_q(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.attn_k(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.attn_v(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.cpu_kernels:
            out = kernels.attention(q, k, v, self.scale)
        else:  # "causal" aligns the last query with the last key, so it holds after a cached prefix
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if T > 1 else None)
        return self.attn_output(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, cpu_kernels: bool):
        super().__init__()
        self.swiglu = kernels.swiglu if cpu_kernels else (lambda gate, up: nn.silu(gate) * up)
        self.ffn_gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.ffn_up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.ffn_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.ffn_down(self.swiglu(self.ffn_gate(x), self.ffn_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cpu_kernels: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, cpu_kernels)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg, cpu_kernels)

    def __call__(self, x: mx.array, cache: KVCache | None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), cache)
        return h + self.ffn(self.ffn_norm(h))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tied_embeddings: bool, dtype: mx.Dtype = mx.float32, cpu_kernels: bool = False):
        """cpu_kernels: attention and SwiGLU from `kernels` (fast on MLX's CPU backend, float32 only)."""
        super().__init__()
        self.config = cfg
        self.dtype = dtype  # of the activations
        self.token_embd = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = [Block(cfg, cpu_kernels) for _ in range(cfg.num_layers)]
        self.output_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.tied_embeddings = tied_embeddings
        if not tied_embeddings:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """tokens: (B, T) int → logits (B, T, vocab)."""
        return self.logits(self.hidden(tokens, cache))

    def hidden(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """tokens: (B, T) int → final hidden states (B, T, hidden), before the output norm."""
        h = self.token_embd(tokens).astype(self.dtype)
        for i, block in enumerate(self.blk):
            h = block(h, cache[i] if cache is not None else None)
        return h

    def logits(self, h: mx.array) -> mx.array:
        h = self.output_norm(h)
        return self.token_embd.as_linear(h) if self.tied_embeddings else self.output(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blk]


def build_model(
    cfg: ModelConfig,
    weights: list[tuple[str, mx.array]],
    *,
    tied_embeddings: bool,
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
    cpu_kernels = mx.default_device() == mx.cpu and dtype == mx.float32
    model = Model(cfg, tied_embeddings=tied_embeddings, dtype=dtype, cpu_kernels=cpu_kernels)
    for path, ggml_type in (blocks or {}).items():
        prefix = path + "."
        set_module(model, path, block_layer(path, ggml_type, {k[len(prefix):]: v for k, v in weights if k.startswith(prefix)}))
    if quantized:
        nn.quantize(model, class_predicate=lambda p, m: quantized.get(p, False))
    model.load_weights(weights, strict=True)
    model.eval()
    model.cpu_dequantized = cpu_dequantized
    return model
