"""A request → what the scheduler runs: the prompt's token ids, and the constraint its answer
must match with this answer's matcher in it.

`response_format` ({"type": "json_object"} or {"type": "json_schema", ...}) is the package's
`constraints.response_format`; `tools` and `tool_choice` are `tools.tool_prompt` (the tools
shown by the chat template, or llama.cpp's generic format) and `tools.tool_constraint` (a forced
call, or the generic format's JSON answer). Each mistake is a one-line RequestError naming the
field. Runs in a worker thread: rendering, tokenizing and compiling a grammar take a while.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import constraints
from ..constraints import Constraint, TokenMatcher
from ..errors import ConstraintError, MlxLlamaError, ToolCallError
from ..prompt import Prompt, encode_prompt
from ..tools import ToolFormat, check_tools, forced_tools, tool_constraint, tool_prompt
from .schema import ChatRequest, CompletionRequest, RequestError


@dataclass
class Prepared:
    prompt: Prompt
    constraint: Constraint | None
    param: str  # the field the constraint came from, for its errors
    tools: ToolFormat | None = None  # the format calls are parsed from; None: no tools in play


def completion(tokenizer, req: CompletionRequest) -> Prepared:
    """A raw prompt (text or token ids), and its response_format."""
    constraint = response_constraint(req)
    try:
        prompt = encode_prompt(tokenizer, req.text(), None)
    except MlxLlamaError as e:
        raise RequestError(str(e), param="prompt") from None
    return Prepared(prompt, constraint, "response_format")


def chat(tokenizer, template, req: ChatRequest) -> Prepared:
    """The messages rendered by the chat template, with the tools when the request has any;
    the constraint of its response_format, or of the tool call it forces."""
    messages = named_results([m.as_dict() for m in req.messages])
    constraint = response_constraint(req)
    if req.tools is None:
        if req.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice", code="invalid_value")
        return Prepared(render(lambda: encode_prompt(tokenizer, messages, template)), constraint, "response_format")
    try:
        schemas = check_tools(req.tools)
        forced_tools(schemas, req.tool_choice)
    except ToolCallError as e:
        field = "tool_choice" if str(e).startswith("tool_choice") else "tools"
        raise RequestError(str(e), param=field, code="invalid_value") from None
    choice = req.tool_choice or "auto"
    if choice != "none" and constraint is not None:
        raise RequestError('response_format cannot be combined with tools unless tool_choice is "none"',
                           param="response_format", code="unsupported")
    prompt, fmt = render(lambda: tool_prompt(tokenizer, template, messages, req.tools, choice))
    if choice == "none":  # no tools shown, none parsed: the answer is text
        return Prepared(prompt, constraint, "response_format")
    try:
        call = tool_constraint(fmt, schemas, choice, tokenizer)
    except (ConstraintError, ToolCallError) as e:  # a tool's parameters are not a usable schema
        raise RequestError(str(e), param="tools", code="invalid_value") from None
    return Prepared(prompt, call, "tools", fmt)


def named_results(messages: list[dict]) -> list[dict]:
    """Tool results with the name of the tool whose call they answer (OpenAI's clients send the
    call's id alone; templates and the generic format show the name)."""
    names = {c.get("id"): c.get("function", {}).get("name") for m in messages for c in m.get("tool_calls") or []
             if isinstance(c, dict) and isinstance(c.get("function"), dict)}
    return [m | {"name": names[m["tool_call_id"]]} if m["role"] == "tool" and "name" not in m
            and names.get(m.get("tool_call_id")) else m for m in messages]


def response_constraint(req) -> Constraint | None:
    if req.response_format is None:
        return None
    try:
        return constraints.response_format(req.response_format)
    except ConstraintError as e:
        raise RequestError(str(e), param="response_format", code="invalid_value") from None


def render(encode):
    """`encode()`, its template or tool-message errors a RequestError on `messages`."""
    try:
        return encode()
    except MlxLlamaError as e:
        raise RequestError(str(e), param="messages") from None


def matcher(prepared: Prepared, tokenizer, n_vocab: int) -> TokenMatcher | None:
    """The answer's place in the constraint, checked here (its first mask): a constraint no text
    can match is a 400 before the request waits for a slot."""
    if prepared.constraint is None:
        return None
    try:
        made = prepared.constraint.matcher(tokenizer, n_vocab)
        made.check()
    except ConstraintError as e:
        raise RequestError(str(e), param=prepared.param, code="invalid_value") from None
    return made
