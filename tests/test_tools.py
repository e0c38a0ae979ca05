"""Tool calls (`mlx_llama.tools`): the format read off a chat template, the tools rendered,
answers parsed into OpenAI's form, forced calls constrained, and `generate --tools`.

The parser is checked on hand-written answers in each format; a random model with a Qwen 2.5
template and `<tool_call>` tokens is the adversary for the constrained hermes call (whatever it
prefers, the call must parse and its arguments validate); SmolLM2, whose template renders no
tools, answers in llama.cpp's generic JSON format."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

import mlx_llama
from mlx_llama.chat_template import ChatTemplate
from mlx_llama.errors import ToolCallError
from mlx_llama.tools import (FORMATS, GENERIC, check_tools, forced_tools, generate_with_tools, parse_tool_calls,
                             tool_constraint, tool_format, tool_prompt)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                   "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
FMT = {f.name: f for f in FORMATS} | {"generic": GENERIC}


@functools.cache
def family_sources() -> dict[str, str]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "family_templates.json")
    with open(path, encoding="utf-8") as fh:
        return {name: f["source"] for name, f in json.load(fh)["families"].items()}


def family_template(family: str) -> ChatTemplate:
    source = family_sources()[family]
    return ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}, name=family)


# ---- the format, from the template ---------------------------------------------------------


@pytest.mark.parametrize("family, expected", [("qwen2.5", "hermes"), ("qwen3", "hermes"), ("llama-3.1", "llama-3"),
                                              ("llama-3.2", "llama-3"), ("gemma", "generic"), ("phi-3.5", "generic")])
def test_format_read_off_the_template(family, expected):
    assert tool_format(family_template(family)).name == expected


def test_a_template_that_renders_tools_gets_them(smol_tokenizer):
    template = family_template("qwen2.5")
    prompt, fmt = tool_prompt(smol_tokenizer, template, [{"role": "user", "content": "Hi"}], TOOLS)
    text = smol_tokenizer.decode(prompt.ids)
    assert fmt.name == "hermes" and "<tools>" in text and '"name": "get_weather"' in text
    plain, _ = tool_prompt(smol_tokenizer, template, [{"role": "user", "content": "Hi"}], TOOLS, "none")
    assert "get_weather" not in smol_tokenizer.decode(plain.ids)


def test_history_with_calls_and_results(smol_tokenizer):
    """An earlier call (arguments as OpenAI's JSON text) and its result, in both kinds of template."""
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": "-3 C, snow"}]
    hermes, _ = tool_prompt(smol_tokenizer, family_template("qwen2.5"), history, TOOLS)
    text = smol_tokenizer.decode(hermes.ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n-3 C, snow\n</tool_response>" in text
    generic, fmt = tool_prompt(smol_tokenizer, family_template("gemma"), history, TOOLS)
    text = smol_tokenizer.decode(generic.ids)
    assert fmt is GENERIC and '{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}' in text
    assert '{"tool_response": {"tool": "get_weather", "content": "-3 C, snow"}}' in text and "`tool_call`" in text


# ---- parsing -------------------------------------------------------------------------------

PARSED = [  # format, answer, content, [(name, arguments)]
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', None, [("add", {"a": 1, "b": 2})]),
    ("hermes", "I would use <tool_call> here, but no.", "I would use <tool_call> here, but no.", []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', []),
    ("llama-3", '{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
    ("llama-3", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
                '{"city": "Rome"}}', None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]),
    ("llama-3", 'The answer is {"a": 1}.', 'The answer is {"a": 1}.', []),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "Sure.", [("add", {"a": 1, "b": 2})]),
    ("mistral", "[TOOL_CALLS] not a list", "[TOOL_CALLS] not a list", []),
    ("generic", '{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}', None, [("add", {"a": 1, "b": 2})]),
    ("generic", '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}', None, [("add", {"a": 1, "b": 2})]),
    ("generic", '{\n  "response": "Hello!"\n}', "Hello!", []),
    ("generic", "Hello!", "Hello!", []),
    ("generic", '{"tool_call": {"name": "add"}, "extra": 1}', '{"tool_call": {"name": "add"}, "extra": 1}', []),
]


@pytest.mark.parametrize("fmt, text, content, calls", PARSED)
def test_parse_tool_calls(fmt, text, content, calls):
    answer = parse_tool_calls(text, FMT[fmt])
    assert answer.content == content
    assert [(c.name, c.arguments) for c in answer.tool_calls] == calls
    message = answer.openai()
    for call, (name, args) in zip(message.get("tool_calls", []), calls):
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == args


# ---- checking a request ----------------------------------------------------------------------

BAD = [
    (lambda: check_tools([]), "tools: expected a non-empty list"),
    (lambda: check_tools([{"type": "function", "function": {"description": "x"}}]), "tools[0]: expected"),
    (lambda: check_tools([WEATHER, WEATHER]), "tools[1]: a second tool named 'get_weather'"),
    (lambda: check_tools([{"type": "function", "function": {"name": "f", "parameters": []}}]), "parameters: expected"),
    (lambda: forced_tools({"add": {}}, {"type": "function", "function": {"name": "sub"}}), "no tool named 'sub'"),
    (lambda: forced_tools({"add": {}}, "always"), "tool_choice: expected"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_requests_are_one_line_errors(make, message):
    with pytest.raises(ToolCallError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        make()
    assert "\n" not in str(e.value)


# ---- constrained calls -----------------------------------------------------------------------


def accepts(constraint, tokenizer, text: str) -> bool:
    """Whether the constraint takes `text` whole (in the tokenizer's tokens), then may end."""
    m = constraint.matcher(tokenizer)
    try:
        for t in tokenizer.encode(text, add_special=False):
            m.mask()
            m.advance(t)
        m.mask()
    except mlx_llama.ConstraintError:
        return False
    return m._matcher.is_accepting()


@pytest.mark.parametrize("fmt", [*FORMATS, GENERIC], ids=lambda f: f.name)
def test_the_forced_call_in_each_format(smol_tokenizer, fmt):
    """A call of the forced tool, as its format writes it, is taken; another tool, an extra or
    missing argument, or the markers left out are not."""
    constraint = tool_constraint(fmt, check_tools(TOOLS), {"type": "function", "function": {"name": "add"}}, smol_tokenizer)

    def call(body: str) -> str:
        return f'{{"tool_call": {body}}}' if fmt is GENERIC else fmt.before + body + fmt.after

    key = fmt.arguments
    assert accepts(constraint, smol_tokenizer, call(f'{{"name": "add", "{key}": {{"a": 1, "b": -2}}}}'))
    for bad in [call(f'{{"name": "get_weather", "{key}": {{"city": "Oslo"}}}}'),
                call(f'{{"name": "add", "{key}": {{"a": 1, "b": 2, "c": 3}}}}'),
                call(f'{{"name": "add", "{key}": {{"a": 1}}}}')] + \
            ([f'{{"name": "add", "{key}": {{"a": 1, "b": 2}}}}'] if fmt.before else []):
        assert not accepts(constraint, smol_tokenizer, bad), bad


@pytest.fixture(scope="module")
def hermes_model(tiny_gguf, smol_gguf):
    """A random model whose vocabulary has `<tool_call>` and `</tool_call>` as user-defined tokens
    (SmolLM2's ids 3 and 4 renamed) and whose template is Qwen 2.5's."""
    tokens = list(smol_gguf.metadata["tokenizer.ggml.tokens"])
    types = list(smol_gguf.metadata["tokenizer.ggml.token_type"])
    tokens[3:5], types[3:5] = ["<tool_call>", "</tool_call>"], [4, 4]
    source = family_sources()["qwen2.5"]
    path = tiny_gguf("F32", context_length=1024, extra_metadata={"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                            "tokenizer.chat_template": source})
    return mlx_llama.load(path)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_parses_and_validates(hermes_model, choice):
    jsonschema = pytest.importorskip("jsonschema")
    model, tok = hermes_model
    for seed in range(3):
        stats = mlx_llama.GenerationStats()
        answer = generate_with_tools(model, tok, "x", TOOLS, choice, 120, temp=1.5, top_k=0, min_p=0, seed=seed, stats=stats)
        assert stats.finish_reason == "stop" and answer.content is None, answer
        (call,) = answer.tool_calls
        assert call.name in ({"get_weather", "add"} if choice == "required" else {"add"})
        jsonschema.validate(call.arguments, {**next(t for t in TOOLS if t["function"]["name"] == call.name)["function"]["parameters"],
                                             "additionalProperties": False})
        assert stats.tokens[0] == 3 and stats.tokens[-1] == 4  # the markers are the special tokens


def test_parameters_with_definitions(hermes_model):
    """pydantic's parameters refer to `#/$defs/…`; nested in a call, they still resolve."""
    jsonschema = pytest.importorskip("jsonschema")
    params = {"$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                                  "required": ["x"]}},
              "type": "object", "properties": {"at": {"$ref": "#/$defs/Point"}}, "required": ["at"]}
    tools = [{"type": "function", "function": {"name": "go", "parameters": params}}]
    model, tok = hermes_model
    for seed in range(2):
        (call,) = generate_with_tools(model, tok, "x", tools, "required", 200, temp=1.5, seed=seed).tool_calls
        jsonschema.validate(call.arguments, params)
        assert set(call.arguments) == {"at"} and set(call.arguments["at"]) == {"x"}


def test_text_that_spells_a_special_token_is_not_that_token(hermes_model):
    """Forced text `<tool_call>` (a regex) is spelt in plain tokens, though the tokenizer would
    match the user-defined token in it: no grammar text may produce a special token."""
    from mlx_llama import constraints

    model, tok = hermes_model
    stats = mlx_llama.GenerationStats()
    out = mlx_llama.generate(model, tok, "x", 20, temp=1.5, stats=stats, constraint=constraints.regex("<tool_call>x"))
    assert out == "<tool_call>x" and 3 not in stats.tokens


@pytest.mark.slow  # the default run has it through the CLI (test_cli_tools)
def test_smollm2_calls_in_the_generic_format(smollm2):
    model, tok = smollm2
    answer = generate_with_tools(model, tok, "What is 12 plus 30?", TOOLS, {"type": "function", "function": {"name": "add"}},
                                 60, temp=0)
    (call,) = answer.tool_calls
    assert call.name == "add" and set(call.arguments) == {"a", "b"}


@pytest.mark.slow
def test_smollm2_may_answer_in_text(smollm2):
    """tool_choice "auto" in the generic format: a call or a response, either way parsed."""
    model, tok = smollm2
    for seed in range(3):
        stats = mlx_llama.GenerationStats()
        answer = generate_with_tools(model, tok, "Say hello.", TOOLS, "auto", 200, temp=0.8, seed=seed, stats=stats)
        assert stats.finish_reason == "stop"
        assert answer.tool_calls or isinstance(answer.content, str) and not answer.content.startswith("{")


# ---- the CLI ------------------------------------------------------------------------------------


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the README runs a shorter one (tests/test_readme.py)
def test_cli_tools(smollm2_path, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    r = run_cli("generate", "-m", str(smollm2_path), "-n", "60", "--temp", "0", "What is the weather in Paris?",
                "--tools", str(tools), "--tool-choice", "get_weather")
    assert r.returncode == 0, r.stderr
    message = json.loads(r.stdout)
    assert message["finish_reason"] == "tool_calls" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])


def test_cli_bad_tools_exit_2_with_one_line(tmp_path):
    for flags, expected in [
        (["--tools", '[{"type": "function", "function": {"name": "f"}}]', "--tool-choice", "g"], "no tool named 'g'"),
        (["--tools", "[1"], "--tools: not valid JSON"),
        (["--tools", str(tmp_path / "none.json")], "none.json: No such file"),
        (["--tool-choice", "required"], "--tool-choice needs --tools"),
        (["--tools", json.dumps(TOOLS), "--json"], "--tools constrains the answer itself"),
    ]:
        r = run_cli("generate", "hi", *flags)
        assert r.returncode == 2, (flags, r.stderr)
        assert r.stderr.startswith("mlx_llama: error: ") and r.stderr.count("\n") == 1, (flags, r.stderr)
        assert expected in r.stderr, (flags, r.stderr)
