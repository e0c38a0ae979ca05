"""Tool calls: the tools shown to the model, its call constrained, and calls parsed out of its answer.

OpenAI's forms throughout. A tool is {"type": "function", "function": {"name", "description",
"parameters": a JSON schema}}; tool_choice is "none", "auto", "required" or {"type": "function",
"function": {"name": NAME}}; a call comes back as {"id", "type": "function", "function":
{"name", "arguments": JSON text}} (`ToolCall.openai`).

How a model writes a call is what it was trained on; its chat template says which, as
llama.cpp's `common_chat_templates` tells the formats apart (`FORMATS`, first match wins):

    hermes   <tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>     Qwen 2.5/3, Hermes
    llama-3  {"name": …, "parameters": {…}}                                Llama 3.1/3.2/3.3
    mistral  [TOOL_CALLS][{"name": …, "arguments": {…}}]                   Mistral Nemo/Small
    generic  {"tool_call": {"name": …, "arguments": {…}}} or {"response": "…"}

The first three render the tools themselves (`ChatTemplate.render(tools=…)`, as transformers
does). Templates that do not (SmolLM2's) get llama.cpp's generic format: the tools described in
a system message, the answer a JSON object, always constrained (a call, or a response).

A forced call (tool_choice "required" or a function) is a constraint: the format's markers
(its special tokens where the vocabulary has them) around JSON whose arguments are valid under
the tool's `parameters`. With "auto" the model chooses, and its answer is parsed afterwards.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from .chat_template import ChatTemplate, encode_chat, stop_token_ids
from .constraints import JSON_OPTIONS, Constraint, _checked, _closed, _is_special, _need_llguidance, json_schema
from .errors import TemplateRaisedError, ToolCallError
from .prompt import Prompt


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes a call. detect: a text in its template's source; arguments: the
    key holding the arguments; before/after: around one call (the generic format's JSON aside)."""

    name: str
    detect: str
    arguments: str = "arguments"
    before: str = ""
    after: str = ""


FORMATS = [
    ToolFormat("hermes", "<tool_call>", before="<tool_call>\n", after="\n</tool_call>"),
    ToolFormat("llama-3", "ipython", arguments="parameters"),  # its template's role for tool results
    ToolFormat("mistral", "[TOOL_CALLS]", before="[TOOL_CALLS][", after="]"),
]
GENERIC = ToolFormat("generic", "")


def tool_format(template: ChatTemplate) -> ToolFormat:
    """The format a chat template's model writes calls in (`GENERIC` when it renders no tools)."""
    for fmt in FORMATS:
        if fmt.detect in template.source:
            return fmt
    return GENERIC


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ToolAnswer:
    """An answer split into its text (None when it is only calls) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]

    def openai(self) -> dict:
        """The assistant message as OpenAI's chat completions return it."""
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.openai() for c in self.tool_calls]
        return message


# ---- checking a request ------------------------------------------------------------------------


def check_tools(tools) -> dict[str, dict]:
    """name → parameters schema of OpenAI-form tools; a one-line `ToolCallError` otherwise."""
    if not isinstance(tools, list) or not tools:
        raise ToolCallError("tools: expected a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolCallError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., ...}}}}")
        params = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolCallError(f"tools[{i}].function.parameters: expected a JSON schema object")
        if function["name"] in out:
            raise ToolCallError(f"tools[{i}]: a second tool named {function['name']!r}")
        out[function["name"]] = params
    return out


def forced_tools(schemas: dict[str, dict], tool_choice) -> list[str]:
    """The tools one of which must be called ([] when the model may answer in text)."""
    if tool_choice in (None, "auto", "none"):
        return []
    if tool_choice == "required":
        return list(schemas)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ToolCallError(f"tool_choice: expected \"none\", \"auto\", \"required\" or "
                            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, not {json.dumps(tool_choice)}")
    if name not in schemas:
        raise ToolCallError(f"tool_choice: no tool named {name!r} (tools: {', '.join(schemas)})")
    return [name]


# ---- the constraint ----------------------------------------------------------------------------


def _call_schema(fmt: ToolFormat, schemas: dict[str, dict], names: list[str]) -> dict:
    """One call of a tool among `names`. Its arguments get no keys beyond the parameters
    (llama.cpp's default for additionalProperties too): a small model otherwise adds keys."""
    calls = [{"type": "object", "properties": {"name": {"const": n}, fmt.arguments: _closed(schemas[n])},
              "required": ["name", fmt.arguments], "additionalProperties": False} for n in names]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _hoisted(schema: dict) -> dict:
    """`schema` with the parameters' definitions (`$defs`, `definitions`: pydantic writes them)
    moved to its root, where their `#/$defs/…` references point once the parameters are nested."""
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in ("$defs", "definitions") and isinstance(v, dict):
                found.setdefault(k, {}).update(v)
            elif k == "properties" and isinstance(v, dict):  # names, not keywords
                out[k] = {name: walk(p) for name, p in v.items()}
            else:
                out[k] = walk(v)
        return out

    root = walk(schema)
    for key, defs in list(found.items()):  # pydantic writes every definition at its top level
        root[key] = {name: walk(d) for name, d in list(defs.items())}
    return root


def tool_constraint(fmt: ToolFormat, schemas: dict[str, dict], tool_choice, tokenizer) -> Constraint | None:
    """What the answer must match: a call of one of the forced tools, in the format; for the
    generic format also a text response when the model may choose. None: unconstrained."""
    names = forced_tools(schemas, tool_choice)
    if fmt is GENERIC:
        if tool_choice == "none":
            return None
        options = [{"type": "object", "properties": {"tool_call": _call_schema(fmt, schemas, names or list(schemas))},
                    "required": ["tool_call"], "additionalProperties": False}]
        if not names:
            options.append({"type": "object", "properties": {"response": {"type": "string"}},
                            "required": ["response"], "additionalProperties": False})
        return json_schema(_hoisted(options[0] if len(options) == 1 else {"anyOf": options}))
    if not names:
        return None
    _need_llguidance()
    schema = {**_hoisted(_call_schema(fmt, schemas, names)), "x-guidance": JSON_OPTIONS}
    lark = f"start: {_literal(fmt.before, tokenizer)} call {_literal(fmt.after, tokenizer)}\ncall: %json {json.dumps(schema)}\n"
    import llguidance

    try:
        spec = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise ToolCallError(f"tool call grammar: {e}") from None
    return _checked("tool call", spec)


def _literal(text: str, tokenizer) -> str:
    """Lark for a fixed text: a special token of the vocabulary as that token (`<[id]>`, as the
    model was trained to write it; no grammar text can make one), the rest as strings."""
    parts = []
    for piece in re.split(r"(<tool_call>|</tool_call>|\[TOOL_CALLS\])", text):
        if not piece:
            continue
        ids = tokenizer.encode(piece, add_special=False, parse_special=True)
        if len(ids) == 1 and _is_special(tokenizer, ids[0], piece.encode()) \
                and tokenizer.token_to_piece(ids[0], special=True) == piece.encode():
            parts.append(f"<[{ids[0]}]>")
        else:
            parts.append(json.dumps(piece))
    return " ".join(parts) or '""'


# ---- the prompt --------------------------------------------------------------------------------

GENERIC_SYSTEM = ("You can call any of the following tools to satisfy the user's requests: {tools}\n\n"
                  "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
                  "reply to the user's request.")


def tool_prompt(tokenizer, template: ChatTemplate, messages: list[dict], tools: list[dict], tool_choice="auto",
                system: str | None = None) -> tuple[Prompt, ToolFormat]:
    """The prompt with the tools shown (not at all for tool_choice "none"), and the call format.

    Earlier calls and results in `messages` (assistant "tool_calls", role "tool") are given to a
    template that renders tools with their arguments as objects (transformers' form); in the
    generic format they become the JSON the model writes and user messages with the result."""
    fmt = tool_format(template)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + list(messages)
    if tool_choice == "none":
        messages, tools = [_plain(m) for m in messages], None
    elif fmt is GENERIC:
        note = GENERIC_SYSTEM.format(tools=json.dumps(tools, ensure_ascii=False))
        messages = [_plain(m) for m in messages]
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
        tools = None
    else:
        messages = [_with_argument_objects(m) for m in messages]
    try:
        text = template.render(messages, add_generation_prompt=True, tools=tools)
    except TemplateRaisedError:  # a template without a system role (gemma): the note goes to the user
        if fmt is not GENERIC or len(messages) < 2 or messages[0]["role"] != "system":
            raise
        first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1].get('content') or ''}"}
        text = template.render([first, *messages[2:]], add_generation_prompt=True)
    ids = encode_chat(tokenizer, text)
    return Prompt(ids, tokenizer.stop_ids | stop_token_ids(template, tokenizer), template), fmt


def _arguments(call: dict) -> dict:
    function = call.get("function", call)
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallError(f"tool call {function.get('name')!r}: arguments are not JSON") from None
    return {"name": function.get("name"), "arguments": args}


def _with_argument_objects(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [{"type": "function", "id": c.get("id"), "function": _arguments(c)} for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _plain(message: dict) -> dict:
    """A message a template without tools can render: calls as the generic format's JSON,
    results as a user message (as llama.cpp's polyfill for such templates does)."""
    if message.get("tool_calls"):
        calls = [_arguments(c) for c in message["tool_calls"]]
        body = {"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls}
        return {"role": "assistant", "content": json.dumps(body, ensure_ascii=False)}
    if message.get("role") == "tool":
        result = {"tool_response": {"tool": message.get("name"), "content": message.get("content")}}
        return {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
    return message


# ---- parsing the answer ------------------------------------------------------------------------


def parse_tool_calls(text: str, fmt: ToolFormat) -> ToolAnswer:
    """The calls in an answer and the text around them. Text that is not a well-formed call
    stays text: a model may mention a tool without calling it."""
    if fmt is GENERIC:
        return _parse_generic(text)
    if fmt.name == "hermes":
        calls, rest = [], text
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
            call = _call(_json(m.group(1)), fmt)
            if call is not None:
                calls.append(call)
                rest = rest.replace(m.group(0), "", 1)
        return _answer(rest, calls)
    if fmt.name == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        value = _json(tail) if marker else None
        calls = [_call(v, fmt) for v in value] if isinstance(value, list) else []
        return _answer(head, calls) if calls and None not in calls else _answer(text, [])
    body = text.strip().removeprefix("<|python_tag|>")  # llama-3: the answer is the call(s), ";"-separated
    calls = [_call(_json(part), fmt) for part in body.split(";") if part.strip()]
    return _answer("", calls) if calls and None not in calls else _answer(text, [])


def _parse_generic(text: str) -> ToolAnswer:
    value = _json(text)
    if not isinstance(value, dict):
        return _answer(text, [])
    if set(value) == {"response"} and isinstance(value["response"], str):
        return ToolAnswer(value["response"], [])
    calls = [value["tool_call"]] if set(value) == {"tool_call"} else value.get("tool_calls") if set(value) == {"tool_calls"} else []
    calls = [_call(c, GENERIC) for c in calls] if isinstance(calls, list) else []
    return _answer("", calls) if calls and None not in calls else _answer(text, [])


def _json(text: str):
    try:
        value, end = json.JSONDecoder().raw_decode(text.strip())
    except ValueError:
        return None
    return value if not text.strip()[end:].strip() else None


def _call(value, fmt: ToolFormat) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(fmt.arguments, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text, as OpenAI sends them
        args = _json(args)
    return ToolCall(value["name"], args) if isinstance(args, dict) else None


def _answer(text: str, calls: list[ToolCall]) -> ToolAnswer:
    text = text.strip()
    return ToolAnswer(text or None if calls else text, calls)


# ---- generating --------------------------------------------------------------------------------


def generate_with_tools(model, tokenizer, messages: str | list[dict], tools: list[dict], tool_choice="auto",
                        max_tokens: int = 256, *, template: ChatTemplate | None = None, system: str | None = None,
                        stats=None, **sampling) -> ToolAnswer:
    """The model's answer to `messages` with `tools` available: its text and its calls.

    tool_choice "auto" (the model chooses), "none" (no tools shown), "required" (a call of
    some tool) or {"type": "function", "function": {"name": NAME}} (a call of that one); a
    forced call is constrained, so it parses and its arguments are valid under the tool's
    parameters. template: default the file's own; sampling: `SamplingParams` fields."""
    from .generation import GenerationStats, generate
    from .prompt import chat_messages, file_template

    schemas = check_tools(tools)
    forced_tools(schemas, tool_choice)  # a bad tool_choice fails before anything is rendered
    template = template if template is not None else file_template(tokenizer)
    if template is None:
        raise ToolCallError("tool calls need a chat template (the model file has none): pass template=")
    prompt, fmt = tool_prompt(tokenizer, template, chat_messages(messages), tools, tool_choice, system)
    constraint = tool_constraint(fmt, schemas, tool_choice, tokenizer)
    stats = stats if stats is not None else GenerationStats()
    text = generate(model, tokenizer, prompt.ids, max_tokens, stats=stats, stop_ids=prompt.stop_ids,
                    constraint=constraint, **sampling)
    return ToolAnswer(text, []) if tool_choice == "none" else parse_tool_calls(text, fmt)
