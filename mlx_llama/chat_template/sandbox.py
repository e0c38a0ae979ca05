"""What a template sees: the Jinja environment and the data, as transformers sets them up.

The environment is transformers' `_compile_jinja_template`, reimplemented: an
`ImmutableSandboxedEnvironment` (templates are untrusted code from the Hub) with `trim_blocks`,
`lstrip_blocks`, `loopcontrols` and the `{% generation %}` tag, transformers' `tojson` and its
globals `raise_exception`, `strftime_now`, `dict` and `namespace`. The data is transformers'
`_normalize_chat_messages` / `_plain_template_data`: plain JSON-like copies. What can grow —
operators, calls, filters, `~`, the output — goes through `limits`' checks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..errors import ChatTemplateError, TemplateRaisedError
from . import limits

# -- the Jinja environment ----------------------------------------------------------------------


def _raise_exception(message):
    raise TemplateRaisedError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON. Written
    # piece by piece (json.dumps' own encoder), so a huge indent is refused, not built.
    b = limits.budget()
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    b.size(width * _nesting(x), "tojson's indentation")  # the longest single piece the encoder writes
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    pieces, n = [], 0
    for piece in encoder.iterencode(x):
        n += len(piece)
        b.size(n, "tojson's output")
        pieces.append(piece)
    return b.account("".join(pieces))


def _nesting(x, depth: int = 0) -> int:
    """How deep lists and dicts nest in `x` (its JSON's deepest indentation, in indents)."""
    if isinstance(x, dict):
        return max((_nesting(v, depth + 1) for v in x.values()), default=depth + 1)
    if isinstance(x, (list, tuple)):
        return max((_nesting(v, depth + 1) for v in x), default=depth + 1)
    return depth


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _environment():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        import jinja2.utils
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover
        raise ChatTemplateError("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from e
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # older versions have known sandbox escapes, and templates are untrusted code
        raise ChatTemplateError(f"chat templates need jinja2>=3.1.6 (installed: {jinja2.__version__})")

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=1)` must work
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    env = _bounded_environment(ImmutableSandboxedEnvironment)(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(f, limits.FILTER_CHECKS.get(name)) for name, f in env.filters.items()})
    env.concat = limits.bounded_concat  # every text a template assembles: blocks, macros, the output
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _bounded_environment(sandbox: type) -> type:
    """The sandbox with `limits`' checks on what can grow: the operators * ** + %, calls
    (string methods, macros), str.format, and `a ~ b` (compiled through the bounded `concat`)."""
    from jinja2.compiler import CodeGenerator, optimizeconst

    class BoundedCodeGenerator(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node, frame):
            # Jinja writes `str_join((a, b))`, which no sandbox hook sees; `concat` is the environment's.
            self.write("concat(map(str, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write(")))")

    class BoundedEnvironment(sandbox):
        intercepted_binops = frozenset(("*", "**", "+", "%"))
        code_generator_class = BoundedCodeGenerator

        def call_binop(self, context, operator, left, right):
            limits.check_binop(operator, left, right)
            return limits.budget().account(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            limits.check_call(__obj, args, kwargs)
            return limits.budget().account(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            formatter = super().wrap_str_format(value)
            if formatter is None:
                return None
            fmt = value.__self__

            @functools.wraps(formatter)
            def bounded(*args, **kwargs):
                limits.check_format(fmt, args, kwargs)
                return limits.budget().account(formatter(*args, **kwargs))

            return bounded

    return BoundedEnvironment


def _bounded_filter(f, check):
    """Filter `f` with `check(value, *args, **kwargs)` first and its result's size counted after.
    functools.wraps keeps Jinja's pass_context/pass_eval_context mark, so the context still
    comes first in `args` when `f` takes it."""
    passes = getattr(f, "jinja_pass_arg", None) is not None

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        if check is not None:
            check(*(args[1:] if passes else args), **kwargs)
        return limits.budget().account(f(*args, **kwargs))

    return bounded


@functools.lru_cache(maxsize=64)
def compile_template(source: str):
    return _environment().from_string(source)


# -- template data ------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain(value: Any) -> Any:
    """A copy built of plain JSON-like types only, so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":  # numpy scalars
        return plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (OpenAI SDK messages)
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def plain_messages(messages) -> list[dict]:
    messages = getattr(messages, "messages", messages)
    out = []
    for m in messages:
        m = plain(m)
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}  # OpenAI-style content=None etc.
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out
