"""Token generation: prefill the prompt, then decode one token at a time.

The decode loop keeps the device busy: it queues step n+1 (`mx.async_eval`) before it hands
token n to the caller, so detokenizing and printing overlap with the next forward pass.
Under a constraint (`constraints.py`) the mask for token n+1 depends on token n, so forward
pass n+1 is queued first and the mask is computed on the CPU while it runs.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import mlx.core as mx

from .decode_step import decoder
from .errors import MlxLlamaError, NonFiniteError
from .model import Model
from .prompt import encode_prompt, file_template
from .sample import SamplingParams, make_sampler

if TYPE_CHECKING:
    from .chat_template import ChatTemplate
    from .constraints import Constraint, TokenMatcher
    from .tokenizer import Tokenizer

PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds attention memory; on the CPU, 256 was fastest


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the first sampled token
    generation_seconds: float = 0.0  # the remaining tokens
    cached_tokens: int = 0  # tokens the cache already held (chat turns after the first)
    finish_reason: str | None = None  # "stop" (end-of-generation token or stop string), "length", "context"
    tokens: list[int] = field(default_factory=list)  # the generated tokens, stop token excluded
    sampled: list[int] = field(default_factory=list)  # every sampled token, stop token included
    constraint_seconds: float = 0.0  # CPU time in the constraint's matcher (masks and advancing)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token's time is counted as prompt time
        return n / self.generation_seconds if n > 0 and self.generation_seconds else 0.0


def prefill_chunks(model: Model, tokens: mx.array, cache) -> Iterator[mx.array | None]:
    """`prefill` one chunk at a time, so that a scheduler can run other work between chunks:
    yields None after each chunk but the last, then the last position's logits (1, V)."""
    while tokens.size > PREFILL_CHUNK:
        model.hidden(tokens[None, :PREFILL_CHUNK], cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[PREFILL_CHUNK:]
        yield None
    # only the last position's logits are needed: skip the vocabulary projection for the rest
    yield model.logits(model.hidden(tokens[None], cache)[:, -1, :])


def prefill(model: Model, tokens: mx.array, cache) -> mx.array:
    """Run all prompt tokens through the model; return the last position's logits (1, V)."""
    *_, logits = prefill_chunks(model, tokens, cache)
    return logits


class TokenSampler:
    """One sequence's sampler: `make_sampler` plus the window of recent tokens its penalties
    read (the last `penalty_last_n`, prompt included)."""

    def __init__(self, params: SamplingParams, seen: list[int]):
        self.sample = make_sampler(params)
        self.n_hist = params.penalty_last_n  # 0 unless a penalty (repeat, frequency, presence) is on
        self.history = mx.array(list(seen)[-self.n_hist:] if self.n_hist else [], mx.int32)

    def __call__(self, logits: mx.array, mask: mx.array | None = None) -> mx.array:
        """logits (1, V) → the next token (1,) int32, not yet evaluated; mask: the tokens a
        constraint allows."""
        y = self.sample(logits, self.history, mask)
        if self.n_hist:
            self.history = mx.concatenate([self.history, y])[-self.n_hist:]
        return y


def generate_tokens(
    model: Model,
    prompt: list[int],
    params: SamplingParams,
    max_tokens: int,
    cache=None,
    past: list[int] = (),
    matcher: TokenMatcher | None = None,
) -> Iterator[int]:
    """Yield sampled token ids, at most `max_tokens` of them (the caller decides when to stop).

    past: tokens the cache already holds before `prompt`, seen by the penalties (as llama.cpp's
    penalties see the whole session). matcher: a constraint's state for this sequence; each
    token is drawn from those it allows, and generation ends after its end-of-generation token."""
    if params.repeat_last_n > model.config.context_length:  # the penalty window is allocated at this size
        raise MlxLlamaError(f"repeat_last_n {params.repeat_last_n} is more than the model's context of "
                            f"{model.config.context_length} tokens")
    sampler = TokenSampler(params, list(past) + list(prompt))
    if hasattr(model, "shared_sampler"):  # a model over several processes: one samples, all get its token
        sampler.sample = model.shared_sampler(sampler.sample)
    cache = cache if cache is not None else model.make_cache()

    def step(logits: mx.array, mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The next token, and whether the logits it was drawn from were all finite (a
        reduction computed with it: NaN logits must stop generation, not become tokens)."""
        return sampler(logits, mask), mx.isfinite(logits).all()

    logits = prefill(model, mx.array(prompt, mx.int32), cache)
    if matcher is not None:
        yield from _constrained_decode(model, cache, logits, step, matcher, max_tokens)
        return
    pending = collections.deque([step(logits)])  # (token, finite) queued, not yet handed out
    mx.async_eval(*pending[0])
    forward, ahead, queued = decoder(model, cache), steps_ahead(), 1
    for n in range(max_tokens):
        while queued < max_tokens and len(pending) <= ahead:  # the next steps go to the device first
            pending.append(step(forward(pending[-1][0])))
            mx.async_eval(*pending[-1])
            queued += 1
        y, finite = pending.popleft()
        if not finite.item():
            raise _non_finite(n)
        yield y.item()


def steps_ahead() -> int:
    """Decode steps queued on the device beyond the token being handed out (MLX_LLAMA_DECODE_AHEAD,
    default 1): more absorb pauses of the host between tokens, at the cost of that many steps
    computed past a stop (the callers trim the cache to the tokens they know)."""
    return max(1, int(os.environ.get("MLX_LLAMA_DECODE_AHEAD", "1") or 1))


def _non_finite(n: int) -> NonFiniteError:
    return NonFiniteError(f"the model computed NaN or infinite logits after {n} generated tokens: its weights "
                          "or settings are broken, or its activations overflow the compute dtype")


def _constrained_decode(model: Model, cache, logits: mx.array, step, matcher: TokenMatcher, max_tokens: int) -> Iterator[int]:
    """The decode loop under a constraint. Token n+1's mask needs token n, so the order is:
    queue forward pass n+1 (it needs only token n on the device), read token n, let the
    matcher take it and compute mask n+1 on the CPU while the pass runs, then queue the draw."""
    mx.async_eval(logits)
    y, finite = step(logits, matcher.mask())  # the first mask is computed while the prompt prefills
    mx.async_eval(y, finite)
    forward = decoder(model, cache)
    for n in range(max_tokens):
        more = n + 1 < max_tokens
        if more:
            logits = forward(y)
            mx.async_eval(logits)
        if not finite.item():
            raise _non_finite(n)
        token = y.item()
        matcher.advance(token)
        if more and not matcher.finished:
            y, finite = step(logits, matcher.mask())
            mx.async_eval(y, finite)
        yield token
        if matcher.finished:  # the end-of-generation token the grammar allowed
            return


class StopStrings:
    """Cuts the text at the first stop string; holds back text that may be a stop string's start."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to show, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def token_budget(context: int, held: int, n_new: int, max_tokens: int, stats: GenerationStats,
                 context_name: str = "the model's context") -> int:
    """How many tokens may be generated after `held` cached and `n_new` prompt tokens within
    `context`; an error when the prompt does not fit. Sets the token counts and the finish
    reason that applies when the budget runs out ("context" when the context cuts `max_tokens`)."""
    if held + n_new >= context:
        raise MlxLlamaError(f"the prompt has {held + n_new} tokens, more than {context_name} of {context}")
    room = context - held - n_new
    stats.prompt_tokens, stats.cached_tokens = n_new, held
    stats.finish_reason = "context" if max_tokens >= room else "length"
    return min(max_tokens, room)


class TokenText:
    """Sampled tokens → the text to show, as `stream_tokens` hands it out: ends at an
    end-of-generation token or a stop string (neither shown); keeps `stats` (counts, timings,
    finish reason) up to date. `done` turns True when generation should stop."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int], stop_strings, stats: GenerationStats, started: float):
        # continuation: a SentencePiece first token keeps its leading space, as llama.cpp prints it after a prompt
        self.detok, self.stops = tokenizer.detokenizer(continuation=True), StopStrings(stop_strings)
        self.stop_ids, self.stats, self.started = stop_ids, stats, started
        self.done = False

    def add(self, token: int) -> str:
        """The text this token completes ('' while held back)."""
        stats, now = self.stats, time.perf_counter()
        if not stats.sampled:
            stats.prompt_seconds = now - self.started
        else:
            stats.generation_seconds = now - self.started - stats.prompt_seconds
        stats.sampled.append(token)
        if token in self.stop_ids:
            stats.finish_reason = "stop"
            return self.close()
        stats.generated_tokens += 1
        stats.tokens.append(token)
        text, stopped = self.stops.push(self.detok.add(token))
        if stopped:
            stats.finish_reason, self.done = "stop", True
        return text

    def close(self) -> str:
        """What was held back, once generation ends at a token limit or an end-of-generation token."""
        self.done = True
        text, stopped = self.stops.push(self.detok.finalize())
        return text + ("" if stopped else self.stops.flush())


def stream_tokens(
    model: Model,
    tokenizer: Tokenizer,
    ids: list[int],
    max_tokens: int,
    *,
    params: SamplingParams,
    cache,
    stats: GenerationStats,
    stop_ids: set[int] | None = None,
    stop_strings=(),
    past: list[int] = (),
    constraint: Constraint | None = None,
) -> Iterator[str]:
    """The generation loop behind `stream_generate` and chat sessions.

    ids: the tokens to prefill, after the `cache.offset` tokens the cache already holds.
    Yields text; stops at an end-of-generation token (`stop_ids`, default the tokenizer's), a stop
    string (not shown), `max_tokens`, or the context length. `stats.sampled` gets every sampled
    token (the stop token included), so callers can tell which tokens the cache holds.
    constraint: the text must match it (see `constraints.py`); it ends at an end-of-generation
    token once the constraint is complete.
    """
    held = cache[0].offset if cache else 0
    max_tokens = token_budget(model.config.context_length, held, len(ids), max_tokens, stats)
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    out = TokenText(tokenizer, stop_ids, stop_strings, stats, time.perf_counter())
    matcher = None if constraint is None else constraint.matcher(tokenizer, model.config.vocab_size)
    for token in generate_tokens(model, ids, params, max_tokens, cache=cache, past=past, matcher=matcher):
        if matcher is not None:
            stats.constraint_seconds = matcher.seconds
        text = out.add(token)
        if text:
            yield text
        if out.done:
            return
    if matcher is not None and matcher.finished:  # its end-of-generation token, though not one of stop_ids
        stats.finish_reason = "stop"
    text = out.close()
    if text:
        yield text


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | list[int] | list[dict],
    max_tokens: int = 256,
    *,
    params: SamplingParams | None = None,
    chat: bool = False,
    system: str | None = None,
    template: ChatTemplate | None = None,
    stats: GenerationStats | None = None,
    stop: tuple[str, ...] | list[str] = (),
    stop_ids: set[int] | None = None,
    constraint: Constraint | None = None,
    **sampling,
) -> Iterator[str]:
    """Yield the generated text piece by piece.

    prompt: raw text (tokenized as llama.cpp's completion mode does: BOS as the file asks,
    special tokens parsed), token ids, or a list of chat messages ({"role", "content"}).
    chat=True (implied by messages, `system` or `template`): the prompt goes through the chat
    template — `template`, else the file's own — applied once, as `mlx_llama generate` does by
    default; the answer then also stops at the template's end-of-turn token.
    params: a `SamplingParams`, or its fields as keyword arguments (`temp=0`, `seed=1` …).
    stop: strings that end generation (not included in the text); stop_ids: token ids that do
    (default: the vocabulary's end-of-generation tokens, plus the template's end of turn).
    stats: filled in as generation goes (timings, token counts, finish reason: "stop",
    "length" or "context").
    constraint: the text must match it — `mlx_llama.constraints.json_schema(schema)`,
    `json_object()`, `pydantic_model(cls)`, `regex(pattern)` or `grammar(lark_or_gbnf)`.
    """
    if params is not None and sampling:
        raise MlxLlamaError(f"give sampling settings either as params= or as keywords, not both ({', '.join(sampling)})")
    params = params if params is not None else SamplingParams(**sampling)
    wants_chat = chat or system is not None or template is not None or (
        isinstance(prompt, (list, tuple)) and any(isinstance(m, dict) for m in prompt))
    if wants_chat and template is None:
        template = file_template(tokenizer)
        if template is None:
            raise MlxLlamaError("the model file has no chat template: pass template=template_for(metadata, NAME)")
    encoded = encode_prompt(tokenizer, prompt, template if wants_chat else None, system)
    if not encoded.ids:
        raise MlxLlamaError("the prompt is empty (no tokens to start from)")
    yield from stream_tokens(
        model, tokenizer, encoded.ids, max_tokens, params=params, cache=model.make_cache(),
        stats=stats if stats is not None else GenerationStats(),
        stop_ids=stop_ids if stop_ids is not None else encoded.stop_ids, stop_strings=stop, constraint=constraint,
    )


def generate(model: Model, tokenizer: Tokenizer, prompt: str | list[int] | list[dict], max_tokens: int = 256, **kwargs) -> str:
    """The whole generated text (see `stream_generate`)."""
    return "".join(stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
