"""Convert a GGUF model to MLX's own format, a directory `mlx_llama.load` opens without decoding:

    python convert/gguf_to_mlx.py model.gguf out_dir [--dtype float16] [--dequantize] [--force]
    mlx_llama generate -m out_dir "Hello"        # or mlx_llama.load("out_dir") in Python

The directory holds the arrays `mlx_llama.load` builds (the compact quantized form by default,
or dense with --dequantize), see `mlx_llama.converted`. It is written whole or not at all; an
existing out_dir is replaced only with --force.
"""

from __future__ import annotations

import argparse
import os
import sys

import mlx_llama  # before mlx.core: preloads the fast BLAS
from mlx_llama import converted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=sorted(converted.DTYPES), default="float16", help="activation / dense-weight dtype")
    ap.add_argument("--dequantize", action="store_true", help="store dense weights instead of the compact quantized form")
    ap.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    args = ap.parse_args(argv)
    try:
        config = converted.save(args.gguf, args.out_dir, args.dtype, args.dequantize, force=args.force)
    except mlx_llama.MlxLlamaError as e:
        print(f"gguf_to_mlx: error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(os.path.join(args.out_dir, converted.WEIGHTS))
    print(f"wrote {args.out_dir}: {size / 2**20:.1f} MiB, {len(config['quantization'])} quantized layers, "
          f"{len(config['blocks'])} in Q2_K/Q6_K blocks, dtype {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
