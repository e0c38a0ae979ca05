"""GGUF file → (Model, Tokenizer): check the tensors against the config, decode, load."""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx
from tqdm import tqdm

from . import _blas, cuda_affine, fusion
from .download import default_model
from .errors import GGUFError
from .architectures import check_tensors, read_config
from .chat_template import check_file_template
from .cpu_mode import choose_cpu_dequantize
from .gguf_file import GGUFFile
from .model import Model, build_model, module_path
from .quants import BF16, F16, F32, Affine, Blocks, decode_tensor, type_name
from .tokenizer import Tokenizer

VECTOR_TYPES = (F32, F16, BF16)  # norm weights, biases, RoPE factors


def load(path=None, *, check_template: bool = True, **kwargs) -> tuple[Model, Tokenizer]:
    """The model and tokenizer of `path`: a GGUF file, an mlx-lm / Hugging Face model directory
    (`mlx_llama.convert.mlx_dir`: safetensors read without decoding GGUF blocks), or None for the
    default model (downloaded on first use). `kwargs`: `load_model`'s options (`progress` applies
    to GGUF files only).

    Everything but the weights of a GGUF file is checked first — the header, the config, the
    vocabulary and (with `check_template`, for callers that will use the file's own chat
    template) the template, rendered once — so a broken file fails before its weights are read."""
    if path is None:
        path = default_model()
    path = os.fspath(path)
    if os.path.isdir(path):
        from .convert.mlx_dir import load_model_dir

        kwargs.pop("progress", None)
        model, metadata = load_model_dir(path, **kwargs)
        tokenizer = Tokenizer(path, metadata)
        if check_template:
            check_file_template(path, metadata)
    else:
        if os.path.exists(path) and not os.path.isfile(path):
            raise GGUFError(path, "not a regular file or a model directory")
        f = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf(f)
        if check_template:
            check_file_template(f.path, f.metadata)
        model = load_model(f, **kwargs)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise GGUFError(path, f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab size is {model.config.vocab_size}")
    if mx.default_device() == mx.cpu:
        _blas.warn_if_slow()
    return model, tokenizer


def load_model(
    f: GGUFFile,
    *,
    dtype: mx.Dtype | None = None,
    cpu_dequantize: bool | None = None,
    progress: bool | None = None,
    fuse: bool | None = None,
) -> Model:
    """Build the model of an open GGUF file.

    dtype: activation/dense-weight dtype; default float32 on the CPU, float16 on a GPU.
    cpu_dequantize: expand quantized weights to dense `dtype` at load (None: the auto rule above).
    progress: show a loading bar (None: for files over 1 GB when stderr is a terminal).
    fuse: stack q/k/v and gate/up into one matrix each (`fusion`; None: on NVIDIA GPUs, where it
    saves kernel launches while decoding).
    """
    cfg = read_config(f)
    shapes = check_tensors(f, cfg)

    on_cpu = mx.default_device() == mx.cpu
    dtype = dtype or (mx.float32 if on_cpu else mx.float16)
    n_params = sum(math.prod(shape) for shape in shapes.values())
    if cpu_dequantize is None:
        cpu_dequantize = choose_cpu_dequantize(n_params)

    weights, quantized, blocks = [], {}, {}
    show = progress if progress is not None else (f.file_size > 2**30 and sys.stderr.isatty())
    bar = tqdm(total=sum(f.tensors[n].data.nbytes for n in shapes), unit="B", unit_scale=True, unit_divisor=1024,
               desc="loading", disable=not show, file=sys.stderr, leave=False, dynamic_ncols=True)
    for name in shapes:
        t = f.tensors[name]
        check_vector(f, t)
        # In its final form: dense in `dense_dtype` (every weight, when expanding), or compact
        # (Q2_K/Q6_K: the file's blocks by default; see `quants.set_subblock16_form`).
        decoded = decode_tensor(f.path, t, dense_dtype=dense_dtype_of(name, dtype), expand=bool(cpu_dequantize))
        add_weight(module_path(name), decoded, weights, quantized, blocks)
        mx.eval([w for _, w in weights[-4:]])  # materialise tensor by tensor: bounded peak memory
        bar.update(t.data.nbytes)
    bar.close()
    if fuse if fuse is not None else cuda_affine.available():
        cfg, weights = fusion.fuse(cfg, weights, quantized, blocks, interleave=cuda_affine.fused_kernels("act"))
    mx.clear_cache()  # return the decoding scratch buffers
    return build_model(cfg, weights, dtype=dtype, quantized=quantized, blocks=blocks,
                       cpu_dequantized=bool(cpu_dequantize))


def check_vector(f: GGUFFile, t) -> None:
    if len(t.shape) == 1 and t.ggml_type not in VECTOR_TYPES:
        raise GGUFError(f.path, f"tensor {t.name!r} is a vector of type {type_name(t.ggml_type)} (expected F32, F16 or BF16)")


def dense_dtype_of(name: str, dtype: mx.Dtype) -> mx.Dtype:
    """The dtype a tensor takes when dense: RoPE frequency factors stay float32 (float16 would
    round every angle), the rest the model's dtype."""
    return mx.float32 if name.startswith("rope_") else dtype


def add_weight(key: str, decoded, weights: list, quantized: dict, blocks: dict) -> None:
    """File a decoded weight under its module path `key` ('blk.0.attn.attn_q.weight'): its
    arrays into `weights`, and its layer's form into `quantized` or `blocks`."""
    path = key[: -len(".weight")]
    if isinstance(decoded, Affine):
        quantized[path] = {"group_size": decoded.group_size, "bits": decoded.bits}
        weights += [(key, decoded.weight), (path + ".scales", decoded.scales), (path + ".biases", decoded.biases)]
    elif isinstance(decoded, Blocks):
        blocks[path] = decoded.ggml_type
        weights += [(f"{path}.{k}", v) for k, v in decoded.fields.items()]
    else:
        weights.append((key, decoded))
