"""The options that constrain `generate`'s output: --json-schema, --json, --regex, --grammar;
and tools the model may call: --tools, --tool-choice."""

from __future__ import annotations

import click

from .common import fail


def constraint_options(f):
    options = [
        click.option("--json-schema", "json_schema", metavar="FILE|JSON",
                     help="The output is JSON valid under this schema: a file, or the schema itself ({...})."),
        click.option("--json", "json_object", is_flag=True, help="The output is a JSON object."),
        click.option("--regex", metavar="PATTERN", help="The output matches PATTERN whole."),
        click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="The output is in the language of a grammar: Lark (rule start) or llama.cpp's GBNF (rule root)."),
        click.option("--tools", "tools_arg", metavar="FILE|JSON",
                     help="Tools the model may call, OpenAI's form (a JSON list, or a file): the answer is printed "
                          "as an OpenAI assistant message (JSON), its tool calls parsed."),
        click.option("--tool-choice", metavar="auto|required|none|NAME", default="auto", show_default=True,
                     help="With --tools: required or a tool NAME forces a call (constrained to the tool's parameters)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def read_constraint(json_schema: str | None, json_object: bool, regex: str | None, grammar_file: str | None):
    """The `Constraint` the options ask for (None without any); one-line errors, exit 2."""
    given = [name for name, v in (("--json-schema", json_schema), ("--json", json_object or None),
                                  ("--regex", regex), ("--grammar", grammar_file)) if v is not None]
    if len(given) > 1:
        fail(f"give one constraint, not {' and '.join(given)}")
    if not given:
        return None
    from .. import constraints
    from ..errors import MlxLlamaError

    try:
        if json_object:
            return constraints.json_object()
        if regex is not None:
            return constraints.regex(regex)
        if grammar_file is not None:
            return constraints.grammar(_read(grammar_file, "--grammar"))
        # a schema is an object, so text starting with "{" is the schema itself, not a file name
        text = json_schema if json_schema.lstrip().startswith("{") else _read(json_schema, "--json-schema")
        return constraints.json_schema(text)
    except MlxLlamaError as e:
        fail(str(e))


def _read(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as e:
        fail(f"{option} {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"{option} {path}: not UTF-8 text (byte {e.start})")


def read_tools(tools_arg: str | None, tool_choice: str, constrained: bool):
    """(tools, tool_choice) in OpenAI's form, checked (None without --tools); errors exit 2."""
    if tools_arg is None:
        if tool_choice != "auto":
            fail("--tool-choice needs --tools")
        return None
    if constrained:
        fail("--tools constrains the answer itself: it cannot take --json-schema, --json, --regex or --grammar")
    import json

    from ..errors import MlxLlamaError
    from ..tools import check_tools, forced_tools

    text = tools_arg if tools_arg.lstrip().startswith("[") else _read(tools_arg, "--tools")
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--tools: not valid JSON ({e})")
    choice = tool_choice if tool_choice in ("auto", "required", "none") else {"type": "function", "function": {"name": tool_choice}}
    try:
        forced_tools(check_tools(tools), choice)
    except MlxLlamaError as e:
        fail(str(e))
    return tools, choice


def answer_with_tools(model, tokenizer, template, prompt: str, system, tools, max_tokens: int, params, stop):
    """Print the answer as an OpenAI assistant message (one JSON line); return its stats."""
    import json

    from ..generation import GenerationStats
    from ..tools import generate_with_tools

    if template is None:
        fail("--tools needs a chat template (the model file has none: pass --chat-template NAME)")
    stats = GenerationStats()
    answer = generate_with_tools(model, tokenizer, prompt, *tools, max_tokens, template=template, system=system,
                                 stats=stats, params=params, stop=stop)
    click.echo(json.dumps({**answer.openai(), "finish_reason": _finish(answer, stats)}, ensure_ascii=False))
    return stats


def _finish(answer, stats) -> str:
    return "tool_calls" if answer.tool_calls else stats.finish_reason
