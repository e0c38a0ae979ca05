"""`mlx_llama chat`: an interactive conversation, its KV cache kept between turns."""

from __future__ import annotations

import os
import sys

import click

from ..errors import MlxLlamaError
from .common import (chat_template, distributed_world, fail, import_mlx, load_model, model_options, read_line, sampling_options,
                     sampling_params, stats_line, template_options)

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


@click.command()
@click.option("-n", "--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1), help="Tokens per answer at most.")
@template_options
@sampling_options
@model_options
def chat(max_tokens, template_name, system, stop, model_path, cpu_dequantize, verbose, **sampling):
    """Talk with the model: multi-turn, the history and its KV cache kept between turns."""
    mx = import_mlx()
    from ..chat import ChatSession
    from ..generation import GenerationStats

    params = sampling_params(sampling)
    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose, check_template=template_name is None)
        session = ChatSession(model, tokenizer, chat_template(tokenizer, template_name), system=system, params=params, stop_strings=stop)
    except MlxLlamaError as e:
        fail(str(e))
    _readline_history()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, refused per line
        sys.stdin.reconfigure(errors="surrogateescape")
    click.echo(CHAT_HELP, err=True)
    while True:
        try:
            line = read_line(">>> ")
            line.encode("utf-8")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        except UnicodeError:
            click.echo("mlx_llama: error: the line is not valid UTF-8", err=True)
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
            if distributed_world() is not None:  # the other ranks cannot be stopped mid-answer: the run ends
                click.echo("\n[interrupted]", err=True)
                sys.stdout.flush()
                os._exit(130)
            answer.close()
            click.echo("\n[stopped]", err=True)
        except MlxLlamaError as e:
            click.echo(f"mlx_llama: error: {e}", err=True)
            continue
        if verbose:
            click.echo(stats_line(stats, mx, verbose), err=True)
