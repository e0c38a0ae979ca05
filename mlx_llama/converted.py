"""A model directory converted from a GGUF file: MLX arrays, loaded without decoding blocks.

    out_dir/config.json          the model's settings, dtype, and which layers are quantized how
    out_dir/weights.safetensors  the arrays `mlx_llama.load` builds, named by module path
    out_dir/tokenizer.gguf       the GGUF file's header, tensors left out: tokenizer and template

The arrays are the compact quantized form by default (or dense with `dequantize=True`), so the
directory reloads with `mx.load`, with the same logits as the GGUF file. The directory is written
beside its place and renamed into it (`atomic`): a kill leaves the old one or the new one whole.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .atomic import check_target, write_dir
from .errors import GGUFError, MlxLlamaError
from .architectures import ModelConfig, config_fields
from .gguf_file import GGUFFile
from .model import BlockLinear, Model, build_model

CONFIG, WEIGHTS, TOKENIZER = "config.json", "weights.safetensors", "tokenizer.gguf"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def is_converted(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def save(gguf_path, out_dir, dtype: str = "float16", dequantize: bool = False, force: bool = False) -> dict:
    """Convert the GGUF file at `gguf_path` into `out_dir`; return the config written. The
    directory is written whole or not at all (`atomic.write_dir`); an existing one is replaced
    only with `force`."""
    from .loader import load_model

    check_target(out_dir, force)  # before the work
    f = GGUFFile(gguf_path)
    model = load_model(f, dtype=DTYPES[dtype], cpu_dequantize=dequantize)
    # which layers are quantized, and how: read back from the modules the loader made
    quantization = {
        path: {"group_size": m.group_size, "bits": m.bits}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    config = {
        "source": os.path.basename(f.path),
        "dtype": dtype,
        "model": asdict(model.config),
        "quantization": quantization,
        "blocks": {path: m.ggml_type for path, m in model.named_modules() if isinstance(m, BlockLinear)},
    }
    def write(out: Path) -> None:
        mx.save_safetensors(str(out / WEIGHTS), dict(tree_flatten(model.parameters())))
        (out / TOKENIZER).write_bytes(header_only(f))
        (out / CONFIG).write_text(json.dumps(config, indent=2))

    write_dir(out_dir, write, force)
    return config


def header_only(f: GGUFFile) -> bytes:
    """The file's magic, version and metadata, with no tensors: a valid GGUF of its own."""
    with open(f.path, "rb") as fh:
        head = fh.read(f.metadata_end)
    return head[:8] + struct.pack("<Q", 0) + head[16:]  # tensor count (bytes 8-16) → 0


def load_dir(path) -> tuple[Model, GGUFFile]:
    """The model of a converted directory, and its header-only GGUF (for the tokenizer)."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, CONFIG)) as fh:
            config = json.load(fh)
        cfg = ModelConfig(**{k: v for k, v in config["model"].items() if k in config_fields()})
        dtype = DTYPES[config["dtype"]]
        weights = mx.load(os.path.join(path, WEIGHTS))
        model = build_model(cfg, list(weights.items()), dtype=dtype,
                            quantized=config["quantization"], blocks=config.get("blocks", {}))
    except MlxLlamaError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage to the directory is the user's one-line error
        raise GGUFError(path, f"not a complete converted model directory ({type(e).__name__}: {_first_line(e)})") from None
    return model, GGUFFile(os.path.join(path, TOKENIZER))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
