"""The errors mlx_llama reports to users: one family, one line each.

Every entry point maps them the same way: the CLI prints `mlx_llama: error: <message>` and
exits with status 2; the Python API raises them as they are.
"""

from __future__ import annotations


class MlxLlamaError(Exception):
    """Base class of the errors mlx_llama reports to users as one line."""


class GGUFError(MlxLlamaError):
    """A model file that cannot be loaded: bad magic, truncated, missing keys, bad shapes…"""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MlxLlamaWarning(UserWarning):
    """Something works, but not as well as it could; the CLI prints it as one line."""


class SlowBLASWarning(MlxLlamaWarning):
    """The model runs on the CPU with MLX's reference BLAS (~100× slower matmuls)."""
