"""Structured output through `mlx_llama serve`: `response_format` and `tools`/`tool_choice`, asked
by the official `openai` client of a real server process (SmolLM2, whose template renders no
tools: llama.cpp's generic format, the answer a constrained JSON object).

One server for the module (2 slots); answers are kept short, their schemas bounded so that a
complete answer fits.
"""

from __future__ import annotations

import json
import threading

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from mlx_llama.prompt import file_template  # noqa: E402
from mlx_llama.tools import tool_prompt  # noqa: E402
from server_fixtures import server_fixtures  # noqa: E402
from test_server import CHAT, post, user  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog", "fish"]}}}}
YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def person_format(schema=PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


server, client, model_id = server_fixtures("--parallel", "4", "--ctx", "1024", "--max-tokens", "128")


ASKS = {  # requests asked alone by the tests, then all at once in one batch
    "person": dict(messages=user("Describe a person."), response_format=person_format(), temperature=0.8, seed=11,
                   max_tokens=64),
    "required": dict(messages=user("What is the weather in Paris?"), tools=TOOLS, tool_choice="required",
                     temperature=0, max_tokens=64),
    "colors": dict(messages=user("Name three colors."), temperature=0, max_tokens=8),
    "sky": dict(messages=user("Why is the sky blue?"), temperature=0, max_tokens=8),
}


@pytest.fixture(scope="module")
def alone(client, model_id):
    """name → the response to ASKS[name] asked alone (once for the module)."""
    answers = {}

    def ask(name: str):
        if name not in answers:
            answers[name] = client.chat.completions.create(model=model_id, **ASKS[name])
        return answers[name]

    return ask


def check_call(call, names) -> dict:
    """A tool call in OpenAI's form, of one of `names`, its arguments valid under its parameters."""
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


# ---- response_format ---------------------------------------------------------------------------


def test_json_schema_answers_validate(alone):
    """Sampled at temperature 0.8: JSON valid under the schema, ended by the model."""
    r = alone("person")
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answers_are_objects(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=user("What is the capital of France? Answer in JSON."),
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=48)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # a raw completion takes response_format too
    r = client.completions.create(model=model_id, prompt="Is Paris in France? The answer, as JSON:", temperature=0,
                                  max_tokens=24, extra_body={"response_format": person_format(YES_NO)})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), YES_NO)


# ---- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice, names", [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
                                           ("required", {"get_weather", "get_time"})])
def test_forced_tool_call(client, model_id, alone, choice, names):
    ask = dict(ASKS["required"], tool_choice=choice)
    r = alone("required") if choice == "required" else client.chat.completions.create(model=model_id, **ask)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    assert len(choice0.message.tool_calls) == 1
    check_call(choice0.message.tool_calls[0], names)


def test_a_call_and_its_result_in_the_history(client, model_id, smol_tokenizer):
    """The next turn: the assistant's call (OpenAI's JSON-text arguments) and the tool's result
    are rendered as the package renders them (the result named after its call's tool);
    tool_choice "none" shows no tools and parses no calls, so the answer is text."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = user("What is the weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model=model_id, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    named = [*messages[:2], dict(messages[2], name="get_weather")]
    prompt, _ = tool_prompt(smol_tokenizer, file_template(smol_tokenizer), named, TOOLS, "none")
    assert r.usage.prompt_tokens == len(prompt.ids)
    assert '"tool": "get_weather"' in smol_tokenizer.decode(prompt.ids)


# ---- errors ------------------------------------------------------------------------------------


def bad_requests(model_id: str) -> list[tuple[str, dict, str, str]]:
    """(what, the request's extra fields, the field named, a word of the message)."""
    def schema(s):
        return {"response_format": person_format(s)}

    weather = {"type": "function", "function": {"name": "get_weather"}}
    return [
        ("unknown response_format type", {"response_format": {"type": "xml"}}, "response_format", "xml"),
        ("schema not an object", {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format", "expected"),
        ("unknown schema type", schema({"type": "wat"}), "response_format", "wat"),
        ("unsatisfiable schema", schema({"type": "integer", "minimum": 5, "maximum": 3}), "response_format",
         "Unsatisfiable"),
        ("tools not a list", {"tools": {"name": "x"}}, "tools", "list"),
        ("empty tools", {"tools": []}, "tools", "non-empty"),
        ("a tool without a name", {"tools": [{"type": "function", "function": {}}]}, "tools", "tools[0]"),
        ("a tool's parameters a bad schema", {"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "wat"}}}], "tool_choice": "required"}, "tools", "wat"),
        ("tool_choice an unknown tool", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice", "no tool named 'x'"),
        ("tool_choice a bad value", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ("tool_choice without tools", {"tool_choice": weather}, "tool_choice", "needs tools"),
        ("response_format with a forced call", {"tools": TOOLS, "tool_choice": "required", **schema(PERSON)},
         "response_format", "cannot be combined"),
        ("arguments that are not JSON", {"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "get_time", "arguments": "{oops"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "noon"}], "tools": TOOLS}, "messages", "not JSON"),
    ]


def test_bad_constraints_and_tools_are_400(server, client, model_id):
    for what, extra, param, word in bad_requests(model_id):
        status, answer = post(server, CHAT, {"model": model_id, "messages": user("Hi"), "max_tokens": 4, **extra})
        error = answer["error"]
        assert status == 400 and error["param"] == param, (what, answer)
        assert word in error["message"] and "\n" not in error["message"], (what, error)
    with pytest.raises(openai.BadRequestError, match="Unsatisfiable"):
        client.chat.completions.create(model=model_id, messages=user("Hi"), max_tokens=4,
                                       response_format=person_format({"type": "integer", "minimum": 5, "maximum": 3}))
    r = client.chat.completions.create(model=model_id, messages=user("Hi"), max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1  # the server goes on serving


# ---- the batch ---------------------------------------------------------------------------------


def streamed(client, model_id, ask: dict) -> tuple[str | None, list]:
    """(content, calls) of a streamed answer; a call comes whole, in one delta at its end."""
    deltas = [c.choices[0] for c in client.chat.completions.create(model=model_id, stream=True, **ask) if c.choices]
    calls = [call for d in deltas for call in d.delta.tool_calls or []]
    assert [call.index for call in calls] == list(range(len(calls)))
    assert deltas[-1].finish_reason == ("tool_calls" if calls else "stop" if ask.get("response_format") else "length")
    content = "".join(d.delta.content or "" for d in deltas)
    return content or None, [(c.function.name, c.function.arguments) for c in calls]


def test_constrained_and_free_requests_in_one_batch(server, client, model_id, alone):
    """Two constrained requests (a JSON schema, a forced call) and two free ones at once, streamed:
    each gets its answer alone (greedy, or the same seed), in shared decode steps."""
    names = list(ASKS)

    def answer(r):
        message = r.choices[0].message
        return message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or []]

    expected = [answer(alone(name)) for name in names]
    together: dict[str, tuple] = {}
    steps = server.health()["steps"]
    threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, streamed(client, model_id, ASKS[n])))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [together[name] for name in names] == expected
    assert expected[1][0] is None and expected[1][1] and not expected[2][1]  # a call alone, a text alone
    # one after another would take a step per token; batched, the 4 share steps
    generated = sum(alone(name).usage.completion_tokens for name in names)
    assert server.health()["steps"] - steps < 0.6 * generated
