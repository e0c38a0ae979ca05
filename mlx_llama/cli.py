"""The `mlx_llama` command line."""

from __future__ import annotations

import os
import re
import resource
import sys
import time
import warnings

import click

from . import _blas
from .errors import MlxLlamaError, MlxLlamaWarning

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx_llama")
def main():
    """Run Llama-family GGUF models on MLX."""
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
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
        help="GGUF file or converted directory (default: SmolLM2-135M-Instruct Q4_1, downloaded once into ~/.cache/mlx_llama).",
    )(f)


def load_model(model_path, cpu_dequantize, verbose):
    """The model and tokenizer, with the CPU-BLAS warning and the --verbose lines on stderr."""
    mx = import_mlx()
    from .download import default_model
    from .loader import load

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
    from .sample import SamplingParams

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
    from .chat_template import template_for

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


@main.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False)
@click.option("-p", "--prompt", help="The prompt (instead of the PROMPT argument); - reads it from stdin.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("-n", "--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Tokens to generate at most.")
@click.option("--chat/--raw", "use_template", default=None,
              help="Wrap the prompt in the chat template (the default when the file has one, or with --chat-template), "
                   "or send it as it is, special tokens parsed.")
@template_options
@sampling_options
@model_options
def generate(prompt_arg, prompt, prompt_file, max_tokens, use_template, template_name, system, stop, model_path, cpu_dequantize, verbose, **sampling):
    """Continue PROMPT, streamed to stdout; speed and memory go to stderr.

    By default, when the file has a chat template (or with --chat-template), the prompt becomes
    a user message in that template, applied once; with --raw it is sent as it is, as llama.cpp's
    completion mode does. With no prompt given and stdin not a terminal, stdin is the prompt.
    """
    prompt = read_prompt(prompt_arg, prompt, prompt_file)
    if use_template is False and (template_name is not None or system is not None):
        fail("--raw sends the prompt as it is: it cannot take --chat-template or --system")
    # --chat, --chat-template or --system ask for a template (an error when there is none);
    # with none of them, the file's own template is used when it has one.
    explicit = bool(use_template) or template_name is not None or system is not None
    mx = import_mlx()
    from .chat_template import looks_templated
    from .generation import GenerationStats, stream_tokens
    from .prompt import encode_prompt, file_template

    params = sampling_params(sampling)
    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose)
        if explicit:  # an error when the file has no template and none is named
            template = chat_template(tokenizer, template_name)
        else:
            template = None if use_template is False else file_template(tokenizer)
        if template is not None and looks_templated(prompt, template):
            click.echo(
                "mlx_llama: warning: the prompt already contains the chat template's markers; "
                "it is sent as it is, not wrapped again (pass --raw to send it as it is without this warning)",
                err=True,
            )
            template = None
        encoded = encode_prompt(tokenizer, prompt, template, system if template is not None else None)
        if verbose:
            click.echo(f"chat template: {template.name if template else 'none (raw prompt)'}", err=True)
        if not encoded.ids:
            fail("the prompt is empty (no tokens to start from)")
        stats = GenerationStats()
        for piece in stream_tokens(model, tokenizer, encoded.ids, max_tokens, params=params, cache=model.make_cache(),
                                   stats=stats, stop_ids=encoded.stop_ids, stop_strings=stop):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    except MlxLlamaError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    click.echo(stats_line(stats, mx, verbose), err=True)


CHAT_HELP = "/reset clears the conversation, /system TEXT sets the system message, Ctrl-C stops an answer, Ctrl-D exits."


def _readline_history():
    """Line editing and a persistent history, where the readline module exists."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    path = os.path.join(os.path.expanduser("~"), ".mlx_llama_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _write_history(readline, path))


def _write_history(readline, path):
    try:
        readline.write_history_file(path)
    except OSError:
        pass


@main.command()
@click.option("-n", "--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1), help="Tokens per answer at most.")
@template_options
@sampling_options
@model_options
def chat(max_tokens, template_name, system, stop, model_path, cpu_dequantize, verbose, **sampling):
    """Talk with the model: multi-turn, the history and its KV cache kept between turns."""
    mx = import_mlx()
    from .chat import ChatSession
    from .generation import GenerationStats

    params = sampling_params(sampling)
    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose)
        session = ChatSession(model, tokenizer, chat_template(tokenizer, template_name), system=system, params=params, stop_strings=stop)
    except MlxLlamaError as e:
        fail(str(e))
    _readline_history()
    click.echo(CHAT_HELP, err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/reset":
            session.reset()
            click.echo("[conversation cleared]", err=True)
            continue
        if command == "/system" or command.startswith("/system "):
            session.set_system(command[len("/system"):].strip())
            click.echo(f"[system message {'set' if session.system else 'cleared'}]", err=True)
            continue
        if command.startswith("/"):
            click.echo(f"[unknown command {command.split()[0]}] {CHAT_HELP}", err=True)
            continue
        stats = GenerationStats()
        answer = session.ask(line, max_tokens, stats)
        try:
            for piece in answer:
                click.echo(piece, nl=False)
                sys.stdout.flush()
            click.echo()
        except KeyboardInterrupt:
            answer.close()
            click.echo("\n[stopped]", err=True)
        except MlxLlamaError as e:
            click.echo(f"mlx_llama: error: {e}", err=True)
            continue
        if verbose:
            click.echo(stats_line(stats, mx, verbose), err=True)


@main.command()
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False), help="Text to score.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=4), help="Chunk length in tokens.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Score only the first N chunks.")
@model_options
def perplexity(text_file, ctx, chunks, model_path, cpu_dequantize, verbose):
    """Perplexity of a text file, by llama.cpp's method (second half of each chunk scored)."""
    mx = import_mlx()
    from .perplexity import perplexity as run

    try:
        with open(text_file, encoding="utf-8", errors="replace", newline="") as fh:  # bytes as llama.cpp reads them
            text = fh.read()
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose)
        t0 = time.perf_counter()

        def show(p):  # the running value, as llama-perplexity prints it
            click.echo(f"[{p.chunks}]{p.value:.4f},", nl=False)
            sys.stdout.flush()

        result = run(model, tokenizer, text, ctx=ctx, chunks=chunks, on_chunk=show)
    except MlxLlamaError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    click.echo()
    click.echo(f"Final estimate: PPL = {result.value:.4f} +/- {result.error:.5f}")
    seconds = time.perf_counter() - t0
    click.echo(f"{result.chunks} chunks of {ctx} tokens, {result.count} scored, {result.chunks * ctx / seconds:.1f} tok/s | {memory_line(mx)}", err=True)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--metadata", "all_metadata", is_flag=True, help="Also print all other metadata keys.")
def info(path, as_json, all_metadata):
    """What a GGUF file holds: architecture, sizes, weight types and their MLX form, tokenizer."""
    from .info import describe, format_text

    try:
        report = describe(path, all_metadata=all_metadata)
    except MlxLlamaError as e:
        fail(str(e))
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        click.echo(format_text(report))


if __name__ == "__main__":
    main()
