"""`mlx_llama serve`: the OpenAI-compatible server (see `mlx_llama.server`)."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from ..errors import MlxLlamaError
from .common import chat_template, fail, load_model, model_options


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--parallel", "-np", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Slots: requests decoded together in one batch; more wait in a queue.")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(min=16),
              help="Context of each slot in tokens, prompt and answer (at most the model's).")
@click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Tokens a request may ask to generate at most; also its default.")
@click.option("--api-key", envvar="MLX_LLAMA_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/ (or set MLX_LLAMA_API_KEY).")
@click.option("--chat-template", "template_name", default=None,
              help="Built-in template (chatml, llama-2, llama-3, zephyr) instead of the file's own.")
@model_options
def serve(host, port, parallel, ctx, max_tokens, api_key, template_name, model_path, cpu_dequantize, verbose):
    """Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions,
    /v1/models), /health, and a chat page at /."""
    try:
        import uvicorn

        from ..server.app import Settings, create_app
        from ..server.scheduler import Scheduler
    except ImportError as e:
        fail(f"the server needs its packages ({e}): pip install -e .")
    sock = bind(host, port)
    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose)
        from ..prompt import file_template

        template = chat_template(tokenizer, template_name) if template_name else file_template(tokenizer)
    except MlxLlamaError as e:
        fail(str(e))
    from ..download import default_model

    model_id = Path(model_path or default_model()).name.removesuffix(".gguf")  # what /v1/models lists
    scheduler = Scheduler(model, tokenizer, slots=parallel, context=ctx)
    settings = Settings(model_id, template, api_key=api_key, max_tokens=max_tokens)
    app = create_app(scheduler, tokenizer, settings)
    bound_host, bound_port = sock.getsockname()[:2]
    click.echo(f"mlx_llama: serving {model_id} on http://{bound_host}:{bound_port} "
               f"({parallel} slots, context {scheduler.context} tokens each)", err=True)
    scheduler.start()
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.stop()
