"""What the commands share: one-line errors, loading a model with its messages, the options
for models, sampling and templates, and reading a prompt."""

from __future__ import annotations

import re
import resource
import sys
import time
import warnings

import click

from .. import _blas
from ..errors import MlxLlamaWarning


def fail(message: str) -> None:
    click.echo(f"mlx_llama: error: {message}", err=True)
    sys.exit(2)


def import_mlx():
    try:
        import mlx.core as mx
    except ImportError as e:
        fail(f"MLX cannot be imported ({e}); on Linux install a backend: pip install 'mlx[cpu]' or 'mlx[cuda13]'")
    return mx


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_python_showwarning = warnings.showwarning


def show_warning(message, category, filename, lineno, file=None, line=None):
    """mlx_llama's own warnings as one line; others as Python shows them."""
    if issubclass(category, MlxLlamaWarning):
        click.echo(f"mlx_llama: warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def model_options(f):
    """-m, --cpu-dequantize/--no-cpu-dequantize and -v, shared by the commands that run a model."""
    f = click.option("-v", "--verbose", is_flag=True, help="Print the device, weight mode, BLAS and load time.")(f)
    f = click.option(
        "--cpu-dequantize/--no-cpu-dequantize",
        default=None,
        help="On the CPU, expand quantized weights to float32 at load (default: when that fits in half the RAM).",
    )(f)
    return click.option(
        "-m", "--model", "model_path", type=click.Path(),
        help="GGUF file or mlx-lm model directory (default: SmolLM2-135M-Instruct Q4_1, downloaded once into ~/.cache/mlx_llama).",
    )(f)


def load_model(model_path, cpu_dequantize, verbose):
    """The model and tokenizer, with the CPU-BLAS warning and the --verbose lines on stderr."""
    mx = import_mlx()
    from ..download import default_model
    from ..loader import load

    path = model_path or default_model()
    t0 = time.perf_counter()
    model, tokenizer = load(path, cpu_dequantize=cpu_dequantize)
    if verbose:
        mode = "float32 (CPU dequantized)" if model.cpu_dequantized else "quantized"
        click.echo(f"model: {path}", err=True)
        click.echo(f"device: {mx.default_device()} | weights: {mode} | BLAS: {_blas.status}", err=True)
        click.echo(f"loaded in {time.perf_counter() - t0:.2f}s", err=True)
    return model, tokenizer


def memory_line(mx) -> str:
    return f"peak memory: MLX {mx.get_peak_memory() / 2**20:.0f} MB, RSS {peak_rss_mb():.0f} MB"


def sampling_options(f):
    """llama.cpp's sampler settings and defaults, shared by generate and chat."""
    options = [
        click.option("--temp", default=0.8, show_default=True, type=click.FloatRange(min=0), help="Temperature; 0 is greedy."),
        click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0), help="Top-k filter; 0 is off."),
        click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1), help="Top-p (nucleus) filter; 1 is off."),
        click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1), help="Min-p filter; 0 is off."),
        click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Repetition penalty; 1 is off."),
        click.option("--repeat-last-n", default=64, show_default=True, type=click.IntRange(min=0), help="Tokens the penalties look back over (prompt included)."),
        click.option("--frequency-penalty", default=0.0, show_default=True, type=float, help="Subtracted from a token's logit per occurrence in the last --repeat-last-n tokens; 0 is off."),
        click.option("--presence-penalty", default=0.0, show_default=True, type=float, help="Subtracted once if the token occurs in the last --repeat-last-n tokens; 0 is off."),
        click.option("--logit-bias", "-l", multiple=True, metavar="TOKEN(+|-)BIAS", help="Add BIAS to TOKEN's logit, as llama.cpp: 15043+1; 15043-inf bans (repeatable)."),
        click.option("--seed", type=int, default=None, help="Random seed, for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop when this text is generated (repeatable); it is not printed."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_params(kw: dict):
    from ..sample import SamplingParams

    names = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty", "seed")
    return SamplingParams(**{n: kw.pop(n) for n in names}, logit_bias=parse_logit_bias(kw.pop("logit_bias")))


def parse_logit_bias(specs) -> dict[int, float]:
    """llama.cpp's --logit-bias syntax: TOKEN, then + or -, then a float (inf included)."""
    out = {}
    for spec in specs:
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(\S+)\s*", spec)
        try:
            value = float(m.group(3)) if m else None
        except ValueError:
            value = None
        if value is None:
            fail(f"--logit-bias {spec!r}: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf)")
        out[int(m.group(1))] = value if m.group(2) == "+" else -value
    return out


def read_prompt(argument: str | None, option: str | None, path: str | None) -> str:
    """The prompt from PROMPT, -p (- for stdin), -f FILE, or stdin when it is not a terminal.

    Text read from stdin or a file loses one trailing newline, as llama.cpp's -f does."""
    given = [x for x in (argument, option, path) if x is not None]
    if len(given) > 1:
        fail("give the prompt one way: as an argument, with -p, or with -f")
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            fail(f"{path}: {e.strerror or e}")
        return _one_newline_less(_utf8(data, path))
    text = argument if argument is not None else option
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = _one_newline_less(_utf8(sys.stdin.buffer.read(), "stdin")) or None
    if text is None:
        fail("no prompt: give PROMPT, -p PROMPT, -f FILE, or pipe it into stdin")
    return text


def _utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"the prompt from {source} is not valid UTF-8 (byte {e.start})")


def _one_newline_less(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def template_options(f):
    f = click.option("--system", default=None, help="System message (chat template only).")(f)
    return click.option("--chat-template", "template_name", default=None,
                        help="Built-in template (chatml, llama-2, llama-3, zephyr) instead of the file's own.")(f)


def chat_template(tokenizer, name):
    from ..chat_template import template_for

    return template_for(tokenizer.metadata, name)


def stats_line(stats, mx, verbose: bool) -> str:
    cached = f" (+{stats.cached_tokens} cached)" if stats.cached_tokens else ""
    line = (
        f"prompt: {stats.prompt_tokens} tokens{cached}, {stats.prompt_tps:.1f} tok/s | "
        f"generation: {stats.generated_tokens} tokens, {stats.generation_tps:.1f} tok/s | finish: {stats.finish_reason}"
    )
    if verbose:
        line += f" | time to first token: {stats.prompt_seconds:.2f}s"
    return f"{line} | {memory_line(mx)}"
