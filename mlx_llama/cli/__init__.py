"""The `mlx_llama` command line: one module per command, what they share in `common`.

Every error a user can cause — a bad flag, a bad file, a bad request — is one line on stderr,
`mlx_llama: error: …`, and exit status 2; click's own usage errors included.
"""

from __future__ import annotations

import os
import sys
import warnings

import click

from .. import _blas
from .bench import bench
from .chat import chat
from .common import end_run, fail, show_warning
from .convert import convert
from .generate import generate
from .info import info
from .perplexity import perplexity
from .serve import serve


class OneLineErrors(click.Group):
    """click's group, with its usage errors as one line instead of usage + hint + message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            end_run()  # a distributed run ended well on this rank
            return result
        except click.exceptions.NoArgsIsHelpError as e:  # `mlx_llama` alone: the help, as click shows it
            click.echo(e.ctx.get_help())
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            fail(" ".join(e.format_message().split()))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx_llama")
def main():
    """Run GGUF language models on MLX."""
    warnings.showwarning = show_warning


for command in (generate, chat, perplexity, info, bench, convert, serve):
    main.add_command(command)


def run(args=None, prog_name=None) -> None:
    """The process entry point (`mlx_llama`, `python -m mlx_llama`): `main`, then an exit that
    skips the native libraries' exit handlers. OpenBLAS's (0.3.21, Debian 12's) can wait forever
    for one of its worker threads at exit; everything the command wrote is flushed first and
    MLX's queued work finished. In-process callers (click's test runner) call `main` itself."""
    try:
        main.main(args, prog_name=prog_name)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    finally:
        _blas.finish_queued_work()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to say
                pass
    os._exit(code)
