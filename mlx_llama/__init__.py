"""mlx_llama: run Llama-family GGUF models on MLX (Metal, CUDA or CPU)."""

from . import _blas

_blas.preload()  # must precede the first `import mlx.core`

from .download import default_model  # noqa: E402  (no MLX needed)
from .errors import ConstraintError, GGUFError, MlxLlamaError, MlxLlamaWarning, SlowBLASWarning, ToolCallError  # noqa: E402

# The rest imports MLX, so it loads on first use: `mlx_llama --help` and error paths stay fast,
# and a missing MLX backend can be reported in one line by the CLI.
_LAZY = {
    "load": "loader",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationStats": "generation",
    "SamplingParams": "sample",
}

__all__ = ["load", "generate", "stream_generate", "default_model", "GenerationStats", "SamplingParams",
           "MlxLlamaError", "GGUFError", "ConstraintError", "ToolCallError", "MlxLlamaWarning", "SlowBLASWarning"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
