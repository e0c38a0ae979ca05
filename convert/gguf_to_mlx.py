"""Convert a GGUF Llama model to MLX's own format: `weights.safetensors` + `config.json`.

The arrays are exactly those `mlx_llama.load` builds (compact quantized form by default, or
dense with --dequantize), stored under the model's module paths, so the directory reloads with
`mx.load` — no GGUF decoding at load time:

    python convert/gguf_to_mlx.py model.gguf out_dir [--dtype float16] [--dequantize]

    model = load_converted("out_dir")   # a mlx_llama Model, same logits as the GGUF
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields

import mlx_llama  # before mlx.core: preloads the fast BLAS
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_llama.gguf_file import GGUFFile, ModelConfig
from mlx_llama.loader import load_model
from mlx_llama.model import BlockLinear, Model, block_layer, set_module

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def convert(gguf_path: str, out_dir: str, dtype: str = "float16", dequantize: bool = False) -> dict:
    model = load_model(GGUFFile(gguf_path), dtype=DTYPES[dtype], cpu_dequantize=dequantize)
    weights = dict(tree_flatten(model.parameters()))
    # which layers are quantized, and how: read back from the modules the loader made
    quantization = {
        path: {"group_size": m.group_size, "bits": m.bits}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    # Q2_K/Q6_K layers kept as the file's blocks (see mlx_llama.quants.Blocks)
    blocks = {path: m.ggml_type for path, m in model.named_modules() if isinstance(m, BlockLinear)}
    config = {
        "source": os.path.basename(gguf_path),
        "dtype": dtype,
        "tied_embeddings": model.tied_embeddings,
        "model": asdict(model.config),
        "quantization": quantization,
        "blocks": blocks,
    }
    os.makedirs(out_dir, exist_ok=True)
    mx.save_safetensors(os.path.join(out_dir, "weights.safetensors"), weights)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def load_converted(out_dir: str) -> Model:
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    init = {f.name for f in fields(ModelConfig) if f.init}
    cfg = ModelConfig(**{k: v for k, v in config["model"].items() if k in init})
    dtype = DTYPES[config["dtype"]]
    model = Model(cfg, tied_embeddings=config["tied_embeddings"], dtype=dtype,
                  cpu_kernels=mx.default_device() == mx.cpu and dtype == mx.float32)
    quantization = config["quantization"]
    if quantization:
        nn.quantize(model, class_predicate=lambda path, m: quantization.get(path, False))
    weights = mx.load(os.path.join(out_dir, "weights.safetensors"))
    for path, ggml_type in config.get("blocks", {}).items():
        arrays = {k[len(path) + 1 :]: v for k, v in weights.items() if k.startswith(path + ".")}
        set_module(model, path, block_layer(path, ggml_type, arrays))
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="activation / dense-weight dtype")
    ap.add_argument("--dequantize", action="store_true", help="store dense weights instead of the compact quantized form")
    args = ap.parse_args(argv)
    try:
        config = convert(args.gguf, args.out_dir, args.dtype, args.dequantize)
    except mlx_llama.MlxLlamaError as e:
        print(f"gguf_to_mlx: error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(os.path.join(args.out_dir, "weights.safetensors"))
    print(f"wrote {args.out_dir}: {size / 2**20:.1f} MiB, {len(config['quantization'])} quantized layers, "
          f"{len(config['blocks'])} in Q2_K/Q6_K blocks, dtype {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
