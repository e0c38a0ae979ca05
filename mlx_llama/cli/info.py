"""`mlx_llama info`: what a GGUF file holds, from its header alone."""

from __future__ import annotations

import click

from ..errors import MlxLlamaError
from .common import fail

@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--metadata", "all_metadata", is_flag=True, help="Also print all other metadata keys.")
def info(path, as_json, all_metadata):
    """What a GGUF file holds: architecture, sizes, weight types and their MLX form, tokenizer."""
    from ..info import describe, format_text

    try:
        report = describe(path, all_metadata=all_metadata)
    except MlxLlamaError as e:
        fail(str(e))
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        click.echo(format_text(report))
