"""Conversions between GGUF files and mlx-lm / Hugging Face model directories.

    gguf_to_mlx(gguf, out_dir)   GGUF file → mlx-lm directory (config.json, model*.safetensors,
                                 tokenizer.json, tokenizer_config.json): mlx_lm.load/generate/server
                                 and mlx_llama.load open it; quantized types stay quantized
    to_gguf(model_dir, out)      mlx-lm or Hugging Face directory → GGUF file llama.cpp runs: MLX
                                 4/5-bit weights become Q4_1/Q5_1 losslessly, other quantized ones
                                 the nearest type, float ones the type asked for

`mlx_llama.load(directory)` reads a model directory directly (`mlx_dir.load_model_dir`). Output
is written under a temporary name and renamed (`atomic`). The modules, along the data path:

    names.py          tensor names GGUF ↔ Hugging Face, Q/K row order, Gemma's norm offset
    hf_config.py      config.json ↔ ModelConfig ({arch}.* keys)
    vocab_to_hf.py    GGUF tokenizer metadata → tokenizer.json, tokenizer_config.json
    vocab_from_hf.py  tokenizer.json / tokenizer.model / tokenizer_config.json → GGUF metadata
    mlx_dir.py        a model directory, read tensor by tensor in GGUF's names and layout
    write_mlx.py      GGUF → mlx-lm directory (`gguf_to_mlx`)
    encoders.py       MLX affine → Q4_1/Q5_1 blocks; float → GGUF types (gguf's quantizers)
    write_gguf.py     model directory → GGUF (`to_gguf`)
    atomic.py         all-or-nothing output, --force, Ctrl-C
"""

from importlib import import_module

_LAZY = {"gguf_to_mlx": "write_mlx", "to_gguf": "write_gguf", "load_model_dir": "mlx_dir"}
__all__ = list(_LAZY)


def __getattr__(name):  # MLX, gguf and tokenizers load on first use
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
