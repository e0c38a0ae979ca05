"""mlx_llama: run Llama-family GGUF models on MLX (Metal, CUDA or CPU)."""

from . import _blas

_blas.preload()  # must precede the first `import mlx.core`

from .gguf_file import GGUFError, MlxLlamaError  # noqa: E402
from .generate import GenerationStats, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .sample import SamplingParams  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationStats", "SamplingParams", "MlxLlamaError", "GGUFError"]
__version__ = "0.1.0"
