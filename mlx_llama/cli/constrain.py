"""The options that constrain `generate`'s output: --json-schema, --json, --regex, --grammar."""

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
