"""What the commands share: one-line errors, loading a model with its messages, the options
for models, sampling and templates, and reading a prompt."""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import time
import warnings

import click

from .. import _blas
from ..errors import MlxLlamaError, MlxLlamaWarning


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


class FiniteFloat(click.FloatRange):
    """click's FloatRange, refusing NaN and infinity too (NaN passes every range comparison)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def utf8_text(ctx, param, value):
    """A click callback for text options and arguments: Python hands over argv bytes that are
    not UTF-8 as lone surrogates, which no tokenizer can encode; refuse them in one line."""
    for text in value if isinstance(value, tuple) else (value,):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise click.BadParameter(f"not valid UTF-8 (at character {e.start})", ctx, param) from None
    return value


def model_options(f):
    """-m, --cpu-dequantize/--no-cpu-dequantize and -v, shared by the commands that run a model;
    --pipeline/--tensor-parallel reach `load_model` without the command seeing them."""
    for flag, help_ in (("--tensor-parallel", "Split every layer's heads and FFN over the ranks started by mlx.launch."),
                        ("--pipeline", "Split the layers over the ranks started by mlx.launch.")):
        f = click.option(flag, is_flag=True, expose_value=False, callback=_join_run, help=help_)(f)
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


# A distributed run (--pipeline/--tensor-parallel): the mode, and this process's `World`.
_RUN: dict = {}


def _join_run(ctx, param, value):
    """Join the run as soon as the flag is parsed, so that from then on only rank 0 prints."""
    if not value:
        return
    mode = "pipeline" if param.name == "pipeline" else "tensor"
    if _RUN.get("mode", mode) != mode:
        raise click.UsageError("--pipeline and --tensor-parallel exclude each other")
    if "world" not in _RUN:
        import_mlx()
        from ..distributed import connect, faults
        from ..distributed.world import DEFAULT_TIMEOUT

        timeout = os.environ.get("MLX_LLAMA_DIST_TIMEOUT", "")
        try:
            world = connect(float(timeout) if timeout else DEFAULT_TIMEOUT)
        except ValueError:
            fail(f"MLX_LLAMA_DIST_TIMEOUT={timeout!r}: expected a number of seconds")
        except MlxLlamaError as e:
            fail(str(e))
        if world.size > 1:
            faults.guard_process(world)
        else:
            click.echo(f"mlx_llama: warning: {param.opts[0]}: no other ranks (start them with mlx.launch); "
                       "running in this process alone", err=True)
        _RUN["world"] = world
    _RUN["mode"] = mode


def distributed_world():
    """This process's `World` when it runs with --pipeline/--tensor-parallel over several ranks."""
    world = _RUN.get("world")
    return world if world is not None and world.size > 1 else None


def load_model(model_path, cpu_dequantize, verbose, check_template: bool = True):
    """The model and tokenizer, with the CPU-BLAS warning and the --verbose lines on stderr;
    this rank's share of them in a distributed run. check_template: the file's own chat template
    will be used, so render it once first."""
    mx = import_mlx()
    from ..download import default_model
    from ..loader import load

    path = model_path or default_model()
    t0 = time.perf_counter()
    if distributed_world() is None:
        model, tokenizer = load(path, cpu_dequantize=cpu_dequantize, check_template=check_template)
    else:
        model, tokenizer = _load_share(path, cpu_dequantize)
    if verbose:
        from ..quants import subblock16_form

        mode = "float32 (CPU dequantized)" if model.cpu_dequantized else f"quantized (Q2_K/Q6_K: {subblock16_form()})"
        click.echo(f"model: {path}", err=True)
        from ..decode_step import compiles

        step = "compiled" if compiles(model) else "op by op"
        click.echo(f"device: {mx.default_device()} | weights: {mode} | BLAS: {_blas.status} | decode step: {step}"
                   + _cuda_pieces(), err=True)
        if distributed_world() is not None:
            click.echo(f"ranks: {model.world.size} over {model.world.backend} | {model.describe()}", err=True)
        click.echo(f"loaded in {time.perf_counter() - t0:.2f}s", err=True)
    return model, tokenizer


def _load_share(path, cpu_dequantize):
    from ..distributed import SameOnEveryRank, load

    world = distributed_world()
    try:
        return load(path, _RUN["mode"], world, cpu_dequantize=cpu_dequantize,
                    reduce=os.environ.get("MLX_LLAMA_TP_REDUCE") or "gather")
    except SameOnEveryRank as e:  # every rank has it: rank 0 says it
        if world.rank != 0:
            end_run()  # not a failure of this rank's own
            sys.exit(2)
        fail(str(e))


def end_run() -> None:
    """This process is done with the run: its leaving is not a failure (the other ranks would
    end the run if it left without saying so)."""
    world = distributed_world()
    if world is not None and world.watchdog.links is not None:
        world.watchdog.links.goodbye()


def read_line(prompt: str) -> str:
    """A line the user types (EOFError at the end of input); in a distributed run rank 0 reads
    it and every rank gets it."""
    world = distributed_world()
    if world is None:
        return input(prompt)
    line = None
    if world.rank == 0:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    line = world.share_text(line)
    if line is None:
        raise EOFError
    return line


def memory_line(mx) -> str:
    return f"peak memory: MLX {mx.get_peak_memory() / 2**20:.0f} MB, RSS {peak_rss_mb():.0f} MB"


def sampling_options(f):
    """llama.cpp's sampler settings and defaults, shared by generate and chat."""
    options = [
        click.option("--temp", default=0.8, show_default=True, type=FiniteFloat(min=0), help="Temperature; 0 is greedy."),
        click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0), help="Top-k filter; 0 is off."),
        click.option("--top-p", default=0.95, show_default=True, type=FiniteFloat(0, 1), help="Top-p (nucleus) filter; 1 is off."),
        click.option("--min-p", default=0.05, show_default=True, type=FiniteFloat(0, 1), help="Min-p filter; 0 is off."),
        click.option("--repeat-penalty", default=1.0, show_default=True, type=FiniteFloat(min=0, min_open=True), help="Repetition penalty; 1 is off."),
        click.option("--repeat-last-n", default=64, show_default=True, type=click.IntRange(min=0), help="Tokens the penalties look back over (prompt included), at most the model's context."),
        click.option("--frequency-penalty", default=0.0, show_default=True, type=FiniteFloat(), help="Subtracted from a token's logit per occurrence in the last --repeat-last-n tokens; 0 is off."),
        click.option("--presence-penalty", default=0.0, show_default=True, type=FiniteFloat(), help="Subtracted once if the token occurs in the last --repeat-last-n tokens; 0 is off."),
        click.option("--logit-bias", "-l", multiple=True, metavar="TOKEN(+|-)BIAS", help="Add BIAS to TOKEN's logit, as llama.cpp: 15043+1; 15043-inf bans (repeatable)."),
        click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Random seed (0 to 2^64-1), for reproducible sampling."),
        click.option("--stop", multiple=True, callback=utf8_text, help="Stop when this text is generated (repeatable); it is not printed."),
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
        if value is None or math.isnan(value):
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
    if (text == "-" or text is None) and distributed_world() is not None:
        fail("in a distributed run, give the prompt as PROMPT, -p or -f: mlx.launch passes stdin on but never closes it")
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
    f = click.option("--system", default=None, callback=utf8_text, help="System message (chat template only).")(f)
    return click.option("--chat-template", "template_name", default=None, callback=utf8_text,
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
        if stats.constraint_seconds:
            line += f" | constraint: {stats.constraint_seconds / max(stats.generated_tokens, 1) * 1e3:.2f} ms/token"
    return f"{line} | {memory_line(mx)}"


def _cuda_pieces() -> str:
    """On NVIDIA GPUs, the CUDA decode kernels in use (`cuda_affine.fused_kernels`, the tensor-core
    matvec), for `-v`."""
    from .. import cuda_affine, cuda_attention, cuda_mma

    if not cuda_affine.available():
        return ""
    pieces = [p for p in cuda_affine.PIECES if cuda_affine.fused_kernels(p)]
    attention = "CUDA kernel" if cuda_attention.available() else "MLX's"
    matvec = "tensor cores" if cuda_mma.enabled() else "scalar"
    return f" | CUDA: {matvec} matvecs, {attention} attention, fused {','.join(pieces) or 'none'}"
