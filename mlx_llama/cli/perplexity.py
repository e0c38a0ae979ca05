"""`mlx_llama perplexity`: llama.cpp's perplexity method on a text file."""

from __future__ import annotations

import sys
import time

import click

from ..errors import MlxLlamaError
from .common import fail, import_mlx, load_model, memory_line, model_options

@click.command()
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False), help="Text to score.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=4), help="Chunk length in tokens.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Score only the first N chunks.")
@model_options
def perplexity(text_file, ctx, chunks, model_path, cpu_dequantize, verbose):
    """Perplexity of a text file, by llama.cpp's method (second half of each chunk scored)."""
    mx = import_mlx()
    from ..perplexity import perplexity as run

    try:
        with open(text_file, encoding="utf-8", errors="replace", newline="") as fh:  # bytes as llama.cpp reads them
            text = fh.read()
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose, check_template=False)
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
