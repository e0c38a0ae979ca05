"""A rank's share of a GGUF file → its part of the model.

Each rank reads only what it holds, tensor by tensor from the memory map as `loader` does: the
tensors of its layers (pipeline), or its rows and columns of every tensor (tensor parallel). Row
ranges are contiguous bytes in the file; a column range is read as the file's whole blocks that
cover it, then trimmed to the range in the form the weight takes: dense columns, whole MLX
affine groups (32), or whole Q2_K/Q6_K super-blocks (256). A boundary inside a group or a
super-block (rare: a head narrower than the block) makes that one shard dense — the exact values
the layer would compute with, at the dense size.
"""

from __future__ import annotations

import dataclasses
import math
import os

import mlx.core as mx

from .. import _blas
from ..architectures import check_tensors, read_config
from ..download import default_model
from ..errors import GGUFError, MlxLlamaError
from ..gguf_file import GGUFFile, TensorInfo
from ..cpu_mode import choose_cpu_dequantize
from ..loader import add_weight, check_vector, dense_dtype_of
from ..model import Model, fill_model, module_path, uses_cpu_kernels
from ..quants import FORMATS, SUBBLOCK16, Affine, Blocks, decode_tensor, dequantize_blocks
from ..tokenizer import Tokenizer
from .base import Part
from .pipeline import PipelineModel, split_layers
from .tensor import GROUP, SUPER_BLOCK, TensorParallelModel, TensorSplit, check_reduce, row_layers, shard_modules
from .world import World, connect, fingerprint

MODES = ("pipeline", "tensor")
VOCABULARY_ENDS = ("token_embd.weight", "output_norm.weight", "output.weight", "output.bias")


def load(path=None, mode: str = "pipeline", world: World | None = None, *, dtype: mx.Dtype | None = None,
         cpu_dequantize: bool | None = None, reduce: str = "gather"):
    """(model, tokenizer) of a GGUF file spread over the ranks of `world` (default: join the run
    `mlx.launch` started). mode: "pipeline" or "tensor"; reduce: how tensor parallelism joins
    attn_output's and ffn_down's shares ("gather": equal to one process; "sum": one all_sum per
    block half, see `tensor`). Every rank calls this with the same arguments; in a single process
    it is `mlx_llama.load`."""
    if mode not in MODES:
        raise MlxLlamaError(f"unknown distributed mode {mode!r} (expected one of {', '.join(MODES)})")
    check_reduce(reduce)
    world = world or connect()
    path = os.fspath(path if path is not None else default_model())
    if world.size == 1:
        from ..loader import load as load_single

        return load_single(path, dtype=dtype, cpu_dequantize=cpu_dequantize)
    if os.path.isdir(path):
        raise MlxLlamaError(f"{path}: a distributed run reads GGUF files (each rank its share), not model directories")
    f = GGUFFile(path)
    cfg = read_config(f)
    shapes = check_tensors(f, cfg)
    dtype = dtype or (mx.float32 if mx.default_device() == mx.cpu else mx.float16)
    # the first collective: the ranks agree on what they run before anyone loads anything
    world.agree(fingerprint(f.file_size, [(n, t.ggml_type, t.shape) for n, t in f.tensors.items()], mode, str(dtype),
                            reduce),
                "model file, --pipeline/--tensor-parallel, activation dtype or MLX_LLAMA_TP_REDUCE")
    # loader's CPU-mode rule, on what one machine holds; the same on every rank
    if cpu_dequantize is None:
        cpu_dequantize = choose_cpu_dequantize(sum(math.prod(s) for s in shapes.values()) // world.size)
    if mode == "pipeline":
        model = build_pipeline(f, cfg, shapes, world, dtype, bool(cpu_dequantize))
    else:
        model = build_tensor_parallel(f, cfg, shapes, world, dtype, bool(cpu_dequantize), reduce)
    tokenizer = Tokenizer.from_gguf(f)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise GGUFError(f.path, f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab size is {cfg.vocab_size}")
    if mx.default_device() == mx.cpu:
        _blas.warn_if_slow()
    return model, tokenizer


def build_pipeline(f, cfg, shapes, world: World, dtype, expand: bool) -> PipelineModel:
    cost = lambda name: tensor_bytes(f.tensors[name], expand, dtype)  # noqa: E731
    layer_bytes = [sum(cost(n) for n in shapes if n.startswith(f"blk.{i}.")) for i in range(cfg.num_layers)]
    layers = split_layers(layer_bytes, sum(cost(n) for n in VOCABULARY_ENDS if n in shapes), world.size)
    mine = layers[world.rank]
    plan = []
    for name in shapes:
        parts = name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) in mine:  # renumbered: this rank's first layer is its blk.0
                plan.append((name, module_path(".".join(["blk", str(int(parts[1]) - mine.start), *parts[2:]])), None))
        elif world.rank == 0 or name not in VOCABULARY_ENDS:
            plan.append((name, module_path(name), None))
    local = dataclasses.replace(cfg, num_layers=len(mine), swa_layers=cfg.swa_layers[mine.start : mine.stop])
    inner = Model(local, dtype=dtype, cpu_kernels=uses_cpu_kernels(dtype))
    if world.rank != 0:
        for name in ("token_embd", "output_norm", "output"):
            inner.pop(name, None)
    _fill(inner, f, plan, dtype, expand)
    model = PipelineModel(inner, cfg, world, layers)
    model.cpu_dequantized = expand
    return model


def build_tensor_parallel(f, cfg, shapes, world: World, dtype, expand: bool, reduce: str = "gather") -> TensorParallelModel:
    in_blocks = not expand and any(f.tensors[n].ggml_type in SUBBLOCK16 for n in shapes if n.endswith("ffn_down.weight"))
    split = TensorSplit(cfg, world.rank, world.size, SUPER_BLOCK if in_blocks else GROUP, reduce)
    plan = [(name, module_path(name), split.part(name)) for name in shapes]
    inner = Model(split.local_config(), dtype=dtype, cpu_kernels=uses_cpu_kernels(dtype))
    if reduce == "gather":
        row_layers(inner, split)
    _fill(inner, f, plan, dtype, expand)
    shard_modules(inner, split, world)
    model = TensorParallelModel(inner, cfg, world)
    model.split, model.cpu_dequantized = split, expand
    return model


def _fill(inner: Model, f: GGUFFile, plan: list[tuple[str, str, Part | None]], dtype, expand: bool) -> None:
    """Decode the plan's (GGUF name, module key, part) tensor by tensor into `inner`."""
    weights, quantized, blocks = [], {}, {}
    for name, key, part in plan:
        t = f.tensors[name]
        check_vector(f, t)
        add_weight(key, read_part(f.path, t, part, dense_dtype_of(name, dtype), expand), weights, quantized, blocks)
        mx.eval([w for _, w in weights[-4:]])  # tensor by tensor: bounded peak memory
    mx.clear_cache()
    fill_model(inner, weights, quantized=quantized, blocks=blocks)


def tensor_bytes(t: TensorInfo, expand: bool, dtype: mx.Dtype) -> int:
    """What a tensor takes in MLX once loaded (dense types and expanded weights in `dtype`)."""
    fmt = FORMATS.get(t.ggml_type)
    n = math.prod(t.shape)
    if fmt is None or expand or fmt.block_size == 1:
        return n * dtype.size
    return int(n * fmt.bits_per_weight / 8)


def read_part(path: str, t: TensorInfo, part: Part | None, dense_dtype: mx.Dtype, expand: bool):
    """Rows and columns of a memory-mapped tensor in their final form (see `decode_tensor`)."""
    if part is None or t.ggml_type not in FORMATS:  # whole, or an unknown type: decode_tensor says so
        return decode_tensor(path, t, dense_dtype=dense_dtype, expand=expand)
    fmt = FORMATS[t.ggml_type]
    if len(t.shape) == 1:  # a vector (a dense type): its rows are its elements
        pieces = [TensorInfo(t.name, t.ggml_type, (b - a,), t.data[a * fmt.type_size : b * fmt.type_size]) for a, b in part.rows]
        return _stack([decode_tensor(path, p, dense_dtype=dense_dtype, expand=expand) for p in pieces])
    rows = part.rows or ((0, t.shape[0]),)
    c0, c1 = part.cols or (0, t.shape[1])
    first, last = c0 // fmt.block_size, -(-c1 // fmt.block_size)  # the file's blocks that cover the columns
    lo, hi = first * fmt.type_size, last * fmt.type_size
    width = (last - first) * fmt.block_size
    pieces = [TensorInfo(t.name, t.ggml_type, (b - a, width), t.data[a:b, lo:hi]) for a, b in rows]
    w = _stack([decode_tensor(path, p, dense_dtype=dense_dtype, expand=expand) for p in pieces])
    start = first * fmt.block_size
    return trim_columns(w, c0 - start, c1 - start, dense_dtype)


def _stack(pieces: list):
    """Row pieces of one weight, in order, as one weight of the same form."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    if isinstance(first, Affine):
        return Affine(*(mx.concatenate([getattr(p, k) for p in pieces]) for k in ("weight", "scales", "biases")),
                      first.bits, first.group_size)
    if isinstance(first, Blocks):
        return Blocks(first.ggml_type, {k: mx.concatenate([p.fields[k] for p in pieces]) for k in first.fields})
    return mx.concatenate(pieces)


def trim_columns(w, a: int, b: int, dtype: mx.Dtype):
    """Columns [a, b) of a decoded weight, kept in its form where the bounds allow."""
    if isinstance(w, Affine):
        gs, bits = w.group_size, w.bits
        if a % gs == 0 and b % gs == 0:
            word = lambda c: c * bits // 32  # noqa: E731  (a group of 32 is `bits` whole words)
            return Affine(w.weight[:, word(a) : word(b)], w.scales[:, a // gs : b // gs], w.biases[:, a // gs : b // gs],
                          bits, gs)
        w = dataclasses.replace(w, exact=None).dequantize(dtype)  # the compact form's values, as the layer uses them
    elif isinstance(w, Blocks):
        if a % 256 == 0 and b % 256 == 0:
            return Blocks(w.ggml_type, {k: v[:, a // 256 : b // 256] for k, v in w.fields.items()})
        w = dequantize_blocks(w.ggml_type, w.fields, dtype)
    return w if (a, b) == (0, w.shape[1]) else w[:, a:b]
