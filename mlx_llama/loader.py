"""GGUF file → (Model, Tokenizer): check the tensors against the config, decode, load."""

from __future__ import annotations

import math
import os
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from .gguf_file import GGUFError, GGUFFile, ModelConfig
from .model import Model, block_layer, module_path, set_module
from .quants import FORMATS, Affine, Blocks, decode_tensor
from .tokenizer import Tokenizer

# The CPU-mode rule: on the CPU, expand quantized weights to float32 (so every matmul goes through
# BLAS) when the float32 model needs at most this share of the machine's physical memory.
CPU_DEQUANTIZE_MEMORY_SHARE = 0.5


def expected_shapes(cfg: ModelConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor the Llama graph needs, with its numpy-order shape."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not tied:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (d,),
            b + "attn_q.weight": (q, d),
            b + "attn_k.weight": (kv, d),
            b + "attn_v.weight": (kv, d),
            b + "attn_output.weight": (d, q),
            b + "ffn_norm.weight": (d,),
            b + "ffn_gate.weight": (f, d),
            b + "ffn_up.weight": (f, d),
            b + "ffn_down.weight": (d, f),
        }
    return shapes


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_cpu_dequantize(n_params: int) -> bool:
    """Auto rule: dequantize on the CPU device when float32 weights fit in half of physical memory."""
    if mx.default_device() != mx.cpu:
        return False
    return n_params * 4 <= CPU_DEQUANTIZE_MEMORY_SHARE * physical_memory()


class _Progress:
    """A one-line progress bar on stderr, shown only for large files on a terminal (or when forced)."""

    def __init__(self, total_bytes: int, show: bool):
        self.total, self.done, self.show, self.t0 = total_bytes, 0, show, time.perf_counter()

    def advance(self, n: int):
        self.done += n
        if self.show:
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\rloading [{bar:<30}] {frac:4.0%} {self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB")
            sys.stderr.flush()

    def close(self):
        if self.show:
            sys.stderr.write(f"  {time.perf_counter() - self.t0:.1f}s\n")


def load(path, **kwargs) -> tuple[Model, Tokenizer]:
    """Load a Llama GGUF file: its model (see `load_model` for the options) and its tokenizer."""
    f = GGUFFile(path)
    tokenizer = Tokenizer.from_gguf(f)
    tokenizer.metadata = f.metadata  # for the chat template and its special tokens
    model = load_model(f, **kwargs)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise GGUFError(f.path, f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab size is {model.config.vocab_size}")
    return model, tokenizer


def load_model(
    f: GGUFFile,
    *,
    dtype: mx.Dtype | None = None,
    cpu_dequantize: bool | None = None,
    progress: bool | None = None,
) -> Model:
    """Build the model of an open GGUF file.

    dtype: activation/dense-weight dtype; default float32 on the CPU, float16 on a GPU.
    cpu_dequantize: expand quantized weights to dense `dtype` at load (None: the auto rule above).
    progress: show a loading bar (None: for files over 1 GB when stderr is a terminal).
    """
    cfg = f.config()
    tied = "output.weight" not in f.tensors
    shapes = expected_shapes(cfg, tied)
    for name, shape in shapes.items():
        if name not in f.tensors:
            raise GGUFError(f.path, f"missing tensor {name!r}")
        if f.tensors[name].shape != shape:
            raise GGUFError(f.path, f"tensor {name!r} has shape {f.tensors[name].shape}, expected {shape} from the config")

    on_cpu = mx.default_device() == mx.cpu
    dtype = dtype or (mx.float32 if on_cpu else mx.float16)
    n_params = sum(math.prod(shape) for shape in shapes.values())
    if cpu_dequantize is None:
        cpu_dequantize = choose_cpu_dequantize(n_params)

    model = Model(cfg, tied_embeddings=tied, dtype=dtype, cpu_kernels=on_cpu and dtype == mx.float32)
    weights, quantized = [], {}
    show = progress if progress is not None else (f.file_size > 2**30 and sys.stderr.isatty())
    bar = _Progress(sum(f.tensors[n].data.nbytes for n in shapes), show)
    for name in shapes:
        t = f.tensors[name]
        # Q2_K/Q6_K (no exact affine form): gguf's float32 values when expanding, else their
        # compact form (the file's blocks by default; see `quants.set_subblock16_form`).
        decoded = decode_tensor(f.path, t, dense_dtype=dtype if cpu_dequantize else mx.float16, expand=bool(cpu_dequantize))
        key = module_path(name)
        path = key[: -len(".weight")]
        if isinstance(decoded, Affine) and not cpu_dequantize:
            quantized[path] = {"group_size": decoded.group_size, "bits": decoded.bits}
            weights += [(key, decoded.weight), (path + ".scales", decoded.scales), (path + ".biases", decoded.biases)]
        elif isinstance(decoded, Affine):
            weights.append((key, decoded.dequantize(dtype)))
        elif isinstance(decoded, Blocks):
            set_module(model, path, block_layer(path, decoded.ggml_type, decoded.fields))
            weights += [(f"{path}.{k}", v) for k, v in decoded.fields.items()]
        elif FORMATS[t.ggml_type].block_size > 1:  # Q2_K/Q6_K dense, already in their dtype
            weights.append((key, decoded.weight))
        else:
            weights.append((key, decoded.weight.astype(dtype)))
        mx.eval([w for _, w in weights[-4:]])  # materialise tensor by tensor: bounded peak memory
        bar.advance(t.data.nbytes)
    bar.close()
    mx.clear_cache()  # return the decoding scratch buffers

    if quantized:
        nn.quantize(model, class_predicate=lambda p, m: quantized.get(p, False))
    model.load_weights(weights, strict=True)
    model.eval()
    model.cpu_dequantized = bool(cpu_dequantize)
    model.source_path = f.path
    return model


