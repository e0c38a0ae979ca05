"""`mlx_llama bench`: prompt and generation tokens/s, as llama.cpp's llama-bench reports them."""

from __future__ import annotations

import json
import os

import click

from ..errors import MlxLlamaError
from .common import fail, import_mlx, load_model, model_options


@click.command()
@click.option("-p", "--n-prompt", default=512, show_default=True, type=click.IntRange(min=0), help="Prompt tokens (pp test; 0 skips it).")
@click.option("-n", "--n-gen", default=128, show_default=True, type=click.IntRange(min=0), help="Generated tokens (tg test; 0 skips it).")
@click.option("-r", "--repetitions", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs per test, after one warm-up.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@model_options
def bench(n_prompt, n_gen, repetitions, as_json, model_path, cpu_dequantize, verbose):
    """Prompt processing (pp) and generation (tg) speed: tokens/s, mean ± sd over repetitions."""
    import_mlx()
    from .. import bench as b
    from ..gguf_file import GGUFFile

    try:
        model, _ = load_model(model_path, cpu_dequantize, verbose)
        if n_prompt + n_gen >= model.config.context_length:
            fail(f"-p {n_prompt} and -n {n_gen} need more than the model's context of {model.config.context_length}")
        path = model_path or _default()
        desc = b.describe_model(GGUFFile(path), model) if os.path.isfile(path) else b.describe_converted(model)
        if hasattr(model, "world"):  # a distributed run: over how many ranks, and how
            desc["backend"] += f" × {model.world.size} ({model.describe().split(',')[0]}, {model.world.backend})"
        results = b.run(model, n_prompt, n_gen, repetitions)
    except MlxLlamaError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps({"model": desc, "tests": [
            {"test": r.test, "tokens": r.tokens, "seconds": r.seconds, "tps_mean": r.mean, "tps_sd": r.sd} for r in results]}, indent=2))
    else:
        click.echo(b.format_table(results, desc))


def _default() -> str:
    from ..download import default_model

    return default_model()
