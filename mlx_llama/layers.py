"""Layers for weights that stay in their file's form: MLX's affine quantization read exactly,
and Q2_K/Q6_K blocks dequantized when used. A layer's weight carries a bias when the file has one.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import cuda_affine, cuda_kernels, cuda_mma
from .cuda_affine import fused_kernels
from .quants import Q6_K, dequantize_blocks


def affine_product(x: mx.array, layer: nn.Module) -> mx.array:
    """x @ W.T for a layer in MLX's affine form (`weight`, `scales`, `biases`, `group_size`, `bits`).

    On MLX's CUDA backend: the bandwidth-bound kernel of `cuda_affine` while decoding (a few
    rows of x), and for prompts the weights dequantized in x's dtype — once x is ready, so that
    only the layers in flight hold dense copies — then one dense matmul (cuBLAS). Elsewhere
    (CPU, Metal): MLX's own quantized matmul."""
    w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    k = x.shape[-1]
    if cuda_affine.available() and cuda_affine.supported(layer.bits, layer.group_size, k):
        if x.size // k <= cuda_affine.MATVEC_MAX_ROWS:
            return affine_matvec(x, layer)
        w, scales, biases = mx.depends([w, scales, biases], [x])
        return x @ mx.dequantize(w, scales, biases, group_size=layer.group_size, bits=layer.bits, dtype=x.dtype).T
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=layer.group_size, bits=layer.bits)


def affine_matvec(x: mx.array, layer: nn.Module, act: int = 0, epilogue: int = 0) -> mx.array:
    """The CUDA matvec for an affine layer: on tensor cores where `cuda_mma` serves it (no
    epilogue), else `cuda_affine`'s (act, epilogue: the gated activation as the input is read, or as
    the products are written; see `cuda_affine.matvec`)."""
    w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    symmetric = getattr(layer, "symmetric", False)
    if not epilogue and cuda_mma.serves(x, layer.bits, x.shape[-1] // (2 if act else 1), act):
        return cuda_mma.matvec(x, w, scales, biases, symmetric=symmetric, act=act)
    return cuda_affine.matvec(x, w, scales, biases, layer.bits, symmetric=symmetric, act=act, epilogue=epilogue)


def gated_product(layer: nn.Module, a: mx.array, activation: str) -> mx.array | None:
    """layer(act(gate) · up) from a = [gate; up] (..., 2K) in one CUDA matvec, the activation
    computed as the matvec reads its input (saves a kernel per layer and token while decoding);
    None where no such kernel serves the layer (then the caller applies the activation)."""
    act = cuda_affine.ACTIVATIONS.get(activation, 0)
    rows = a.size // a.shape[-1]
    if not act or not cuda_affine.available() or rows > cuda_affine.MATVEC_MAX_ROWS or not fused_kernels("glu"):
        return None
    k = a.shape[-1] // 2
    if isinstance(layer, AffineLinear) and cuda_affine.supported(layer.bits, layer.group_size, k):
        y = affine_matvec(a, layer, act)
    elif type(layer) is BlockLinear and layer.ggml_type == Q6_K:
        y = cuda_kernels.block_matvec(a, Q6_K, layer.fields(), act=act)
    else:
        return None
    return y + layer["bias"] if "bias" in layer else y


def gated_rows_product(layer: nn.Module, x: mx.array, activation: str) -> mx.array | None:
    """act(gate) · up from a layer whose rows alternate gate, up (`fusion`'s interleaved gate/up),
    in one CUDA matvec that applies the activation as it writes (no kernel of its own per layer and
    token); None where no such kernel serves the layer (then the caller splits the product)."""
    act = cuda_affine.ACTIVATIONS.get(activation, 0)
    k = x.shape[-1]
    if (not act or not isinstance(layer, AffineLinear) or not cuda_affine.available() or "bias" in layer
            or x.size // k > cuda_affine.MATVEC_MAX_ROWS or not cuda_affine.supported(layer.bits, layer.group_size, k)):
        return None
    return affine_matvec(x, layer, epilogue=act)


class Pending(NamedTuple):
    """A layer's product not computed yet (`deferred`): `cuda_norm.add_norm` computes it with the
    residual add and the norm that follow, in one kernel; `resolve` computes it alone."""

    layer: nn.Module
    x: mx.array


_DEFERRING = contextvars.ContextVar("deferring", default=False)


@contextlib.contextmanager
def deferring():
    """Products may be `deferred` within: the compiled decode step's trace. Its steps run one after
    another (each reads the position the last one computed after its logits, `decode_step`), and
    so do a layer's "tail" launches, which share the layer's counter; steps op by op have no such
    order (tokens given, several steps in one graph: a CUDA graph may run two of them at once)."""
    token = _DEFERRING.set(True)
    try:
        yield
    finally:
        _DEFERRING.reset(token)


def deferred(layer: nn.Module, x: mx.array) -> mx.array | Pending:
    """layer(x), or a `Pending` product where the add and norm after it can join its CUDA matvec
    (the "tail" piece, in a compiled decode step: an affine layer without bias, a few rows of x)."""
    k = x.shape[-1]
    if not (_DEFERRING.get() and fused_kernels("tail") and cuda_affine.available()) or "bias" in layer \
            or x.size // k > cuda_affine.MATVEC_MAX_ROWS:
        return layer(x)
    if type(layer) is AffineLinear and cuda_affine.supported(layer.bits, layer.group_size, k) \
            and not cuda_mma.serves(x, layer.bits, k, 0):
        return Pending(layer, x)
    if type(layer) is BlockLinear and layer.ggml_type == Q6_K and cuda_kernels.available():
        return Pending(layer, x)
    return layer(x)


def resolve(v: mx.array | Pending) -> mx.array:
    """A product `deferred` computed now (an array stays as it is)."""
    return v.layer(v.x) if isinstance(v, Pending) else v


def add_norm_after(p: Pending, resid: mx.array, norm: nn.Module) -> tuple[mx.array, mx.array]:
    """(resid + p's product, norm of that) by one CUDA matvec (`cuda_affine.matvec_add_norm`)."""
    layer = p.layer
    if getattr(layer, "norm_counter", None) is None:
        layer.norm_counter = _Counter()
    if type(layer) is BlockLinear:
        return cuda_kernels.block_matvec_add_norm(p.x, layer.fields(), resid, norm.weight, norm.eps, layer.norm_counter.array)
    return cuda_affine.matvec_add_norm(p.x, layer["weight"], layer["scales"], layer["biases"], layer.bits, resid, norm.weight,
                                       norm.eps, layer.norm_counter.array, symmetric=getattr(layer, "symmetric", False))


class _Counter:
    """A layer's launch counter for `matvec_add_norm` (zero between launches), held outside the
    module's parameters."""

    def __init__(self):
        self.array = cuda_affine.new_counter()


def mark_symmetric(model: nn.Module) -> None:
    """Mark the affine layers whose biases are all −2^(bits−1) · scale (`cuda_affine.is_symmetric`):
    their CUDA matvec reads the scales alone (a tenth fewer bytes for Q4_0). Only where that
    matvec runs (an NVIDIA GPU) and the piece is on."""
    if not cuda_affine.available() or not fused_kernels("sym"):
        return
    for _, m in model.named_modules():
        if isinstance(m, (AffineLinear, QuantizedEmbedding)):
            m.symmetric = cuda_affine.is_symmetric(m["scales"], m["biases"], m.bits)


class AffineLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, its product by `affine_product`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = affine_product(x, self)
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    def to_quantized(self, group_size=None, bits=None, mode="affine", **kwargs):
        return AffineLinear.from_linear(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """Looks rows up in float32: MLX's own layer computes them in the float16 of the scales,
    which would round every embedding value the GGUF file holds exactly. As the output
    projection (tied embeddings), its product is `affine_product`'s."""

    def __call__(self, x: mx.array) -> mx.array:
        scales, biases = self["scales"][x].astype(mx.float32), self["biases"][x].astype(mx.float32)
        return mx.dequantize(self["weight"][x], scales, biases, group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return affine_product(x, self)


class Embedding(nn.Embedding):
    def to_quantized(self, group_size=None, bits=None, mode="affine", **kwargs):
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class BlockLinear(nn.Module):
    """A linear layer whose weight stays in the GGUF file's Q2_K/Q6_K blocks (see
    `quants.Blocks`): dequantized exactly, in the input's dtype, each time it runs. `fields`
    holds the blocks' fields, and "bias" when the layer has one."""

    def __init__(self, ggml_type: int, fields: dict[str, mx.array]):
        super().__init__()
        self.ggml_type = ggml_type
        for name, value in fields.items():
            self[name] = value

    def fields(self, rows: mx.array | None = None, after: mx.array | None = None) -> dict[str, mx.array]:
        """The block fields (or the rows `rows` of them); with `after`, usable only once `after`
        is computed: MLX would otherwise schedule every layer's (input-independent)
        dequantization at the start of a forward pass and hold all the dense weights at once."""
        names = [k for k, v in self.items() if isinstance(v, mx.array) and k != "bias"]
        arrays = [self[k] if rows is None else self[k][rows] for k in names]
        if after is not None:
            arrays = mx.depends(arrays, [after])
        return dict(zip(names, arrays))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.product(x)
        return y + self["bias"] if "bias" in self else y

    def product(self, x: mx.array) -> mx.array:
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
        return self.product(x)


def block_layer(path: str, ggml_type: int, fields: dict[str, mx.array]) -> BlockLinear:
    """The layer for Q2_K/Q6_K blocks at module `path`: the embedding table or a linear layer."""
    return (BlockEmbedding if path == "token_embd" else BlockLinear)(ggml_type, fields)
