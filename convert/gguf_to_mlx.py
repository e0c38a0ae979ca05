"""GGUF file → mlx-lm model directory: `mlx_llama convert gguf-to-mlx` under a script's name.

    python convert/gguf_to_mlx.py model.gguf out_dir [--dtype float16] [--strict] [--force]
    mlx_lm.generate --model out_dir --prompt "Hello"      # or: mlx_llama generate -m out_dir "Hello"

The directory holds config.json, model.safetensors (quantized types stay quantized, in MLX's
affine form) and the tokenizer files; `--help` lists the options (`mlx_llama.convert`).
"""

import sys

from mlx_llama.cli import run

if __name__ == "__main__":
    run(["convert", "gguf-to-mlx", *sys.argv[1:]], prog_name="gguf_to_mlx.py")
