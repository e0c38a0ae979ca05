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


class ChatTemplateError(MlxLlamaError):
    """A chat template that cannot be chosen, compiled or rendered."""


class TemplateRaisedError(ChatTemplateError):
    """The template called `raise_exception(message)`; `.message` is the template's text."""

    def __init__(self, message: str, template_name: str = "chat template"):
        self.message = str(message)
        self.template_name = template_name
        super().__init__(f"{template_name}: {self.message}")


class ChatTemplateSecurityError(ChatTemplateError):
    """The sandbox refused something the template did (dunder attributes, mutating methods…)."""


class NonFiniteError(MlxLlamaError):
    """The model computed NaN or infinite logits: broken weights or settings, or activations
    that overflow the compute dtype. Generation stops instead of sampling from them."""


class ChatTemplateLimitError(ChatTemplateError):
    """Rendering a template went past a limit (time, output size, or an operation that would
    build a huge number or string): see `chat_template.RenderLimits`."""


class ConstraintError(MlxLlamaError):
    """A schema, regex or grammar that cannot be used, or output that cannot continue under it."""


class ToolCallError(MlxLlamaError):
    """Tools or a tool_choice that cannot be used (not OpenAI's form, an unknown tool name)."""


class MlxLlamaWarning(UserWarning):
    """Something works, but not as well as it could; the CLI prints it as one line."""


class SlowBLASWarning(MlxLlamaWarning):
    """The model runs on the CPU with MLX's reference BLAS (~100× slower matmuls)."""
