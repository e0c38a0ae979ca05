"""`mlx_llama convert`: GGUF ⇄ mlx-lm directories, Hugging Face → GGUF (`mlx_llama.convert`).

Each subcommand prints what became of every tensor type (and the error measured), writes its
output under a temporary name renamed at the end, and refuses an existing output without
--force; a bad input is one line and exit status 2, Ctrl-C leaves nothing behind (exit 130).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import MlxLlamaError
from .common import fail, import_mlx

DTYPES = ("float16", "bfloat16", "float32")
OUTTYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1")
force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")
progress_option = click.option("--progress/--no-progress", default=None,
                               help="Show a progress bar (default: when stderr is a terminal).")


@click.group()
def convert():
    """Convert models: GGUF ⇄ mlx-lm directories, Hugging Face → GGUF."""


@convert.command("gguf-to-mlx")
@click.argument("gguf_path", metavar="GGUF", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path())
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="Of dense weights, norms and quantization scales; float32 keeps every value "
                   "(and runs much faster on MLX's CPU backend, whose float16 arithmetic is slow).")
@click.option("--strict", is_flag=True, help="Refuse types MLX cannot keep quantized (Q2_K, Q6_K) instead of dequantizing them.")
@force_option
@progress_option
def gguf_to_mlx(gguf_path, out_dir, dtype, strict, force, progress):
    """A GGUF file as an mlx-lm model directory (mlx_lm.load / generate / server, mlx_llama -m)."""
    reports = _run(lambda c: c.gguf_to_mlx(gguf_path, out_dir, dtype=dtype, strict=strict, force=force, progress=progress))
    rows = [("GGUF type", "tensors", "MLX form", "max |Δ| vs GGUF")]
    for r in sorted(reports, key=lambda r: -r.file_bytes):
        form = r.form
        if r.dequantized:
            form += (f", dequantized: {8 * r.bytes / _weights(r):.3g} bits per weight instead of "
                     f"{8 * r.file_bytes / _weights(r):.3g} (+{(r.bytes - r.file_bytes) / 2**20:.1f} MiB)")
        rows.append((r.ggml_type, str(r.tensors), form, _error(r.max_error)))
    _table(rows)
    files = sorted(p.name for p in Path(out_dir).iterdir())
    size = sum(p.stat().st_size for p in Path(out_dir).iterdir())
    click.echo(f"wrote {out_dir}: {', '.join(files)} ({size / 2**20:.1f} MiB)")


def _weights(r) -> float:
    """Weights of a dequantized type's tensors, from the bytes it takes densely (2 or 4 each)."""
    return r.bytes / (4 if "float32" in r.form else 2)


def _to_gguf_command(name: str, what: str) -> click.Command:
    # One command under the two names people look for: an mlx-lm directory is a Hugging Face
    # one whose weights MLX quantized.
    @click.command(name, help=f"{what} model directory (any mlx-lm or Hugging Face one) as a GGUF file. MLX "
                              "4/5-bit weights become Q4_1/Q5_1 without loss, other quantized ones Q8_0; float "
                              "matrices become --outtype.")
    @click.argument("model_dir", metavar="DIR", type=click.Path(file_okay=False))
    @click.argument("out_path", metavar="OUT.gguf", type=click.Path(dir_okay=False))
    @click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
                  help="GGUF type of float matrices (1-D tensors stay F32).")
    @force_option
    @progress_option
    def command(model_dir, out_path, outtype, force, progress):
        reports = _run(lambda c: c.to_gguf(model_dir, out_path, outtype=outtype, force=force, progress=progress))
        rows = [("directory", "GGUF type", "tensors", "max |Δ|", "RMS Δ / RMS w")]
        for r in reports:
            rows.append((r.source, r.target, str(r.tensors), _error(r.max_error),
                         "0" if not r.max_error else f"{100 * r.relative_rms:.3g}%"))
        _table(rows)
        click.echo(f"wrote {out_path} ({Path(out_path).stat().st_size / 2**20:.1f} MiB)")

    return command


convert.add_command(_to_gguf_command("mlx-to-gguf", "An mlx-lm"))
convert.add_command(_to_gguf_command("hf-to-gguf", "A Hugging Face"))


def _run(work):
    """`work(mlx_llama.convert)`, with one-line errors, SIGTERM handled as Ctrl-C, exit 130 then."""
    import_mlx()
    from .. import convert as conversions
    from ..convert.atomic import signals_as_interrupts

    try:
        with signals_as_interrupts():
            return work(conversions)
    except MlxLlamaError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("mlx_llama: interrupted: nothing written", err=True)
        sys.exit(130)


def _error(e: float) -> str:
    return "0 (exact)" if e == 0 else f"{e:.2e}"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
