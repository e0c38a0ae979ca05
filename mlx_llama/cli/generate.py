"""`mlx_llama generate`: one prompt, the answer streamed to stdout."""

from __future__ import annotations

import sys

import click

from ..errors import MlxLlamaError
from .common import (chat_template, fail, import_mlx, load_model, model_options, read_prompt, sampling_options,
                     sampling_params, stats_line, template_options, utf8_text)
from .constrain import answer_with_tools, constraint_options, read_constraint, read_tools

@click.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False, callback=utf8_text)
@click.option("-p", "--prompt", callback=utf8_text, help="The prompt (instead of the PROMPT argument); - reads it from stdin.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("-n", "--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Tokens to generate at most.")
@click.option("--chat/--raw", "use_template", default=None,
              help="Wrap the prompt in the chat template (the default when the file has one, or with --chat-template), "
                   "or send it as it is, special tokens parsed.")
@template_options
@sampling_options
@constraint_options
@model_options
def generate(prompt_arg, prompt, prompt_file, max_tokens, use_template, template_name, system, stop, model_path, cpu_dequantize, verbose,
             json_schema, json_object, regex, grammar_file, tools_arg, tool_choice, **sampling):
    """Continue PROMPT, streamed to stdout; speed and memory go to stderr.

    By default, when the file has a chat template (or with --chat-template), the prompt becomes
    a user message in that template, applied once; with --raw it is sent as it is, as llama.cpp's
    completion mode does. With no prompt given and stdin not a terminal, stdin is the prompt.
    --json-schema, --json, --regex or --grammar constrain the output to match; with --tools the
    answer is an OpenAI assistant message (JSON) with the tool calls parsed out of it.
    """
    prompt = read_prompt(prompt_arg, prompt, prompt_file)
    if use_template is False and (template_name is not None or system is not None):
        fail("--raw sends the prompt as it is: it cannot take --chat-template or --system")
    # --chat, --chat-template or --system ask for a template (an error when there is none);
    # with none of them, the file's own template is used when it has one.
    explicit = bool(use_template) or template_name is not None or system is not None
    mx = import_mlx()
    from ..chat_template import looks_templated
    from ..generation import GenerationStats, stream_tokens
    from ..prompt import encode_prompt, file_template

    params = sampling_params(sampling)
    constraint = read_constraint(json_schema, json_object, regex, grammar_file)  # checked before the model loads
    tools = read_tools(tools_arg, tool_choice, constraint is not None)
    try:
        model, tokenizer = load_model(model_path, cpu_dequantize, verbose,
                                      check_template=use_template is not False and template_name is None)
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
        if tools is not None:
            stats = answer_with_tools(model, tokenizer, template, prompt, system, tools, max_tokens, params, stop)
            click.echo(stats_line(stats, mx, verbose), err=True)
            return
        encoded = encode_prompt(tokenizer, prompt, template, system if template is not None else None)
        if verbose:
            click.echo(f"chat template: {template.name if template else 'none (raw prompt)'}", err=True)
        if not encoded.ids:
            fail("the prompt is empty (no tokens to start from)")
        stats = GenerationStats()
        for piece in stream_tokens(model, tokenizer, encoded.ids, max_tokens, params=params, cache=model.make_cache(),
                                   stats=stats, stop_ids=encoded.stop_ids, stop_strings=stop, constraint=constraint):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    except MlxLlamaError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    click.echo(stats_line(stats, mx, verbose), err=True)
