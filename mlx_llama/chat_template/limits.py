"""Bounds on rendering a template: its time, its output, and the values it builds.

A chat template is code from the file. Jinja's sandbox keeps it from touching Python's
internals, but not from running long (nested `range(100000)` loops) or building huge values in
one step (`9**(9**9)`, `'a' * 10**9`, `tojson(indent=10**8)`). So every render runs under a
`RenderLimits`:

* time: a watchdog raises in the rendering thread once `seconds` have passed (between two
  Python bytecodes; the steps that run in C are bounded by the size checks below);
* output: the rendered text, and any one string or list built on the way, at most `max_output`
  characters (items), and all of them together at most `max_built` (what a loop could keep);
* integers: `**` and `*` refused when the result would need more than `max_int_bits` bits;
* repetitions and widths: `*` on strings and lists, `center`/`ljust`/`zfill`/`expandtabs`,
  the `indent`, `center`, `batch` and `slice` filters, `tojson`'s indent, `%` and `format`
  widths — refused before they run when their result would pass `max_output`.

Each refusal is a `ChatTemplateLimitError` (one line).
"""

from __future__ import annotations

import contextvars
import ctypes
import math
import re
import string
import threading
from dataclasses import dataclass, replace

from ..errors import ChatTemplateLimitError


@dataclass(frozen=True)
class RenderLimits:
    seconds: float = 1.0  # wall-clock time of one render
    max_output: int = 1 << 20  # characters of output, and of any one string (items of a list) built
    max_built: int = 64 << 20  # characters (items) of all strings and lists built in one render
    max_int_bits: int = 4096  # integers built by ** and *


_default = RenderLimits()


def default_limits() -> RenderLimits:
    return _default


def set_render_limits(**changes) -> RenderLimits:
    """Change the limits templates are rendered under by default (`RenderLimits`' fields), for
    this process; returns the new default. A `ChatTemplate(limits=...)` overrides it."""
    global _default
    _default = replace(_default, **changes)
    return _default


class _Budget:
    """What one render has built so far, against its limits."""

    def __init__(self, limits: RenderLimits):
        self.limits, self.built = limits, 0

    def refuse(self, what: str):
        raise ChatTemplateLimitError(f"{what} (the template limits: see mlx_llama.chat_template.RenderLimits)")

    def size(self, n: int, what: str) -> None:
        """A value of `n` characters (items) is about to be built."""
        if n > self.limits.max_output:
            self.refuse(f"{what} would be {n} characters long, more than {self.limits.max_output}")

    def account(self, value):
        """`value` was built: count its size (strings, lists, tuples, dicts); return it."""
        if isinstance(value, (str, list, tuple, dict)):
            n = len(value)
            self.size(n, "a value")
            self.built += n
            if self.built > self.limits.max_built:
                self.refuse(f"the template built more than {self.limits.max_built} characters in all")
        return value


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)


def budget() -> _Budget:
    """The running render's budget; outside a render (Jinja folds constants when it compiles)
    a fresh one under the default limits."""
    return _current.get() or _Budget(_default)


# -- operators ------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, (str, list, tuple))


def check_binop(op: str, left, right) -> None:
    """Refuse `left op right` before Python computes it, when its result would be too big."""
    b = budget()
    if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        if right * math.log2(abs(left)) > b.limits.max_int_bits:
            b.refuse(f"{_short(left)} ** {_short(right)} has more than {b.limits.max_int_bits} bits")
    elif op == "*":
        if _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > b.limits.max_int_bits + 1:
                b.refuse(f"a product of more than {b.limits.max_int_bits} bits")
        elif _is_seq(left) and _is_int(right) or _is_int(left) and _is_seq(right):
            seq, n = (left, right) if _is_seq(left) else (right, left)
            b.size(len(seq) * max(n, 0), "a repetition")
    elif op == "+" and _is_seq(left) and _is_seq(right):
        b.size(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        check_printf(left, right)


_PRINTF_WIDTHS = re.compile(r"%[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


def check_printf(fmt: str, args) -> None:
    """`fmt % args`: no width or precision (written or taken from `args` with *) past max_output."""
    b = budget()
    star = any("*" in m.group(0) for m in _PRINTF_WIDTHS.finditer(fmt))
    numbers = [int(n) for m in _PRINTF_WIDTHS.finditer(fmt) for n in m.groups() if n and n != "*"]
    if star:
        numbers += [a for a in (args if isinstance(args, tuple) else (args,)) if _is_int(a)]
    if any(abs(n) > b.limits.max_output for n in numbers):
        b.refuse("a format width or precision past the output limit")


def check_format(fmt: str, args, kwargs) -> None:
    """`fmt.format(*args, **kwargs)` (str.format and the sandbox's formatter): no width past max_output."""
    b = budget()
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:
        return  # a malformed format string: str.format raises it
    numbers = [int(n) for spec in specs for n in re.findall(r"\d+", spec)]
    if any("{" in spec for spec in specs):  # widths taken from the arguments: "{:{w}}"
        mappings = [a for a in args if isinstance(a, dict)]  # format_map's
        numbers += [v for v in (*args, *kwargs.values(), *(v for m in mappings for v in m.values())) if _is_int(v)]
    if any(n > b.limits.max_output for n in numbers):
        b.refuse("a format width past the output limit")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 20 else text[:17] + "..."


# -- calls and filters ----------------------------------------------------------------------------

_WIDTH_METHODS = ("center", "ljust", "rjust", "zfill")


def check_call(obj, args, kwargs) -> None:
    """Refuse a call to a string method whose result would pass max_output."""
    s = getattr(obj, "__self__", None)
    if not isinstance(s, str):
        return
    b, name = budget(), getattr(obj, "__name__", "")
    if name in _WIDTH_METHODS and args and _is_int(args[0]):
        b.size(args[0], f"str.{name}({args[0]})")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tab):
            b.size(len(s) + s.count("\t") * tab, "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = s.count(args[0]) if args[0] else len(s) + 1
        if len(args) > 2 and _is_int(args[2]) and args[2] >= 0:
            count = min(count, args[2])
        b.size(len(s) + count * (len(args[1]) - len(args[0])), "str.replace")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        b.size(sum(len(x) if isinstance(x, str) else 0 for x in args[0]) + len(s) * len(args[0]), "str.join")
    elif name in ("format", "format_map"):
        check_format(s, args, kwargs)


def _width_filter(arg: int, default):
    """Checks a filter whose result grows with one numeric argument (position `arg`, after the value)."""

    def check(value, *args, **kwargs):
        n = args[arg] if len(args) > arg else default(kwargs)
        if _is_int(n):
            budget().size(n, "the filter's width or count")

    return check


def _check_indent(value, width=4, *args, **kwargs):
    width = kwargs.get("width", width)
    prefix = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    text = str(value)
    budget().size(len(text) + prefix * (text.count("\n") + 1), "the indented text")


def _check_join(value, d="", *args, **kwargs):
    if isinstance(value, (list, tuple)):
        size = sum(len(x) if isinstance(x, str) else 0 for x in value) + len(str(d)) * len(value)
        budget().size(size, "the joined text")


def _check_replace(s, old="", new="", count=None, **kwargs):
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        check_call(s.replace, (old, new) + ((count,) if _is_int(count) else ()), {})


def _check_format(value, *args, **kwargs):
    if isinstance(value, str):
        check_printf(value, args or kwargs)


# filter name → a check of its value and arguments, run before the filter
FILTER_CHECKS = {
    "center": _width_filter(0, lambda kw: kw.get("width", 80)),
    "batch": _width_filter(0, lambda kw: kw.get("linecount")),
    "slice": _width_filter(0, lambda kw: kw.get("slices")),
    "indent": _check_indent,
    "join": _check_join,
    "replace": _check_replace,
    "format": _check_format,
}


def bounded_concat(pieces) -> str:
    """The environment's `concat`: text assembled piece by piece, its length checked as it grows."""
    b, out, n = budget(), [], 0
    for piece in pieces:
        n += len(piece)
        b.size(n, "the text")
        out.append(piece)
    return b.account("".join(out))


# -- the render: a budget, a deadline -------------------------------------------------------------


class _TimeUp(BaseException):
    """Raised in the rendering thread by the watchdog. A BaseException, so that no `except
    Exception` in Jinja or a filter swallows it."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class _Watchdog:
    """Raises `_TimeUp` in this thread after `seconds`, unless stopped first. The lock makes the
    raise happen only while the render runs, and `stop` clears one that fired but is not yet
    delivered, so it can never surface in the caller's code."""

    def __init__(self, seconds: float):
        self.thread, self.active, self.fired = threading.get_ident(), False, False
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def start(self) -> None:
        """Arm it. Call inside the `try` whose `finally` calls `stop`: the raise can come before
        this returns (while the timer's thread starts, on a busy machine or a short limit)."""
        self.active = True
        self.timer.start()

    def _fire(self):
        with self.lock:
            if self.active:
                self.fired = True
                _set_async_exc(self.thread, _TimeUp)

    def stop(self) -> bool:
        """Whether time ran out."""
        with self.lock:
            self.active = False
        self.timer.cancel()
        if self.fired:
            _set_async_exc(self.thread, ctypes.py_object())  # NULL: clear it if still pending
        return self.fired


def run_limited(render, limits: RenderLimits | None = None):
    """`render()` under `limits` (default: `default_limits()`): its budget and its deadline."""
    limits = limits or _default
    token = _current.set(_Budget(limits))
    watchdog, result = _Watchdog(limits.seconds), None
    try:
        watchdog.start()
        result = render()
    except _TimeUp:
        pass
    finally:
        while True:  # inline, not a function: a late _TimeUp is caught here, whenever it lands
            try:
                out_of_time = watchdog.stop()
                break
            except _TimeUp:  # delivered while stopping: stop again (idempotent)
                continue
        _current.reset(token)
    if out_of_time:
        raise ChatTemplateLimitError(f"rendering took longer than {limits.seconds:g} s "
                                     "(the template limits: see mlx_llama.chat_template.RenderLimits)")
    return result
