"""mlx-lm or Hugging Face model directory → GGUF file: `mlx_llama convert mlx-to-gguf` under a
script's name.

    python convert/to_gguf.py model_dir out.gguf [--outtype f16|bf16|f32|q8_0|q4_0|q4_1] [--force]

MLX 4/5-bit weights become Q4_1/Q5_1 without loss, other quantized ones Q8_0; float matrices
become --outtype; the table printed gives the error of each conversion (`mlx_llama.convert`).
"""

import sys

from mlx_llama.cli import run

if __name__ == "__main__":
    run(["convert", "mlx-to-gguf", *sys.argv[1:]], prog_name="to_gguf.py")
