"""OpenAI's HTTP schema: request bodies as pydantic models, responses and stream chunks as the
dicts OpenAI sends, errors as OpenAI's error JSON.

Sampling fields map onto llama.cpp's sampler chain (`sample.SamplingParams`); a field the
request leaves out keeps llama.cpp's default, as `mlx_llama generate` does. `top_k`, `min_p` and
`repeat_penalty` are llama.cpp's extensions of the schema. `response_format` and `tools` are
turned into a constraint and a prompt by `prepare.py`; a chat answer with tools is parsed
into OpenAI's `tool_calls` here (`Reply`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..sample import SamplingParams
from ..tools import ToolFormat, parse_tool_calls


class RequestError(Exception):
    """A request the server refuses: one line for the client, with its HTTP status."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The request body as `model`; malformed JSON or a bad field value is a RequestError
    naming the field."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise RequestError(f"{where}: {err['msg']}", param=where, code="invalid_value") from None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and completion requests share."""

    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "1" is no number

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = Field(default_factory=dict)
    n: int = Field(1, ge=1, le=1)
    logprobs: bool | int | None = None
    response_format: dict | None = None  # checked by `constraints.response_format`

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        out = {}
        for key, bias in (v or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"keys are token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {key}: a bias is between -100 and 100, not {bias}")
            out[int(key)] = bias
        return out

    def limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, vocab_size: int) -> SamplingParams:
        if self.logprobs:
            raise RequestError("logprobs are not supported", param="logprobs", code="unsupported")
        bad = [t for t in self.logit_bias if t >= vocab_size]
        if bad:
            raise RequestError(f"logit_bias: token {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                               param="logit_bias", code="invalid_value")
        given = {"temp": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                 "repeat_penalty": self.repeat_penalty}
        # a negative seed asks for a random one, as llama.cpp's -1
        seed = self.seed if self.seed is None or self.seed >= 0 else None
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, seed=seed,
                              logit_bias=dict(self.logit_bias))


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, in OpenAI's form
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        extra = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id, "name": self.name}
        return out | {k: v for k, v in extra.items() if v is not None}


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None  # checked by `tools.check_tools`
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # accepted; a model writes as many calls as it does

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False

    def text(self) -> str | list[int]:
        """The prompt: a text or token ids (a list of one text is that text)."""
        if self.echo:
            raise RequestError("echo is not supported", param="echo", code="unsupported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) > 1:
                raise RequestError("one prompt per request", param="prompt", code="unsupported")
            p = p[0]
        if not p:
            raise RequestError("the prompt is empty", param="prompt", code="invalid_value")
        return p


# ---- responses ------------------------------------------------------------------------------


def usage(done) -> dict:
    """OpenAI's usage object from a scheduler `Finished` event."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def timings(done) -> dict:
    """llama.cpp's `timings` extension: where the time went."""
    n = done.completion_tokens - 1  # the first token's time counts as prompt time
    return {"prompt_ms": round(done.prompt_seconds * 1000, 1), "predicted_ms": round(done.generation_seconds * 1000, 1),
            "predicted_per_second": round(n / done.generation_seconds, 2) if n > 0 and done.generation_seconds else None}


class Reply:
    """One response's id, kind and model, and its bodies and stream chunks.

    tools: the format the model writes calls in, when the request has tools: the answer's calls
    are parsed out of its text into OpenAI's `tool_calls` (finish_reason "tool_calls")."""

    def __init__(self, chat: bool, model: str, tools: ToolFormat | None = None):
        self.chat, self.model, self.tools = chat, model, tools
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def message(self, text: str, done) -> tuple[dict, str]:
        """A chat answer's assistant message and finish_reason."""
        if self.tools is None:
            return {"role": "assistant", "content": text}, done.finish_reason
        answer = parse_tool_calls(text, self.tools)
        return answer.openai(), "tool_calls" if answer.tool_calls else done.finish_reason

    def body(self, text: str, done) -> dict:
        if self.chat:
            message, finish_reason = self.message(text, done)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            return self._wrap("chat.completion", [choice], usage=usage(done), timings=timings(done))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._wrap("text_completion", [choice], usage=usage(done), timings=timings(done))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._wrap("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._wrap("text_completion", [choice])

    def message_chunk(self, message: dict) -> dict:
        """A whole assistant message as one chunk: its text, and its calls with their `index`."""
        delta = {"content": message["content"]} if message["content"] is not None else {}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._wrap("chat.completion.chunk", [choice])

    def usage_chunk(self, done) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._wrap(obj, [], usage=usage(done), timings=timings(done))
