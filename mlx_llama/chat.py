"""Conversations: the chat template applied once, and a KV cache kept between turns.

Each turn renders the whole conversation with the template, tokenizes it as llama.cpp's chat
mode does, and prefills only what the cache does not already hold: the cache is cut back to
the longest common prefix of the new tokens and the tokens it holds, so a re-tokenized reply or
a changed system message costs only the tokens after the first difference.
"""

from __future__ import annotations

from typing import Iterator

from .chat_template import ChatTemplate, template_for
from .generation import GenerationStats, stream_tokens
from .prompt import encode_prompt
from .sample import SamplingParams


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, tokenizer, template: ChatTemplate | None = None, *, system: str | None = None,
                 params: SamplingParams | None = None, stop_strings=()):
        """template: the chat template (default: the file's own; an error when it has none)."""
        self.model, self.tokenizer = model, tokenizer
        self.template = template if template is not None else template_for(tokenizer.metadata)
        self.system = system
        self.params = params or SamplingParams()
        self.stop_strings = tuple(stop_strings)
        self.messages: list[dict] = []  # user and assistant turns
        self.cache = model.make_cache()
        self.cached: list[int] = []  # the tokens the cache holds

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def ask(self, text: str, max_tokens: int = 512, stats: GenerationStats | None = None) -> Iterator[str]:
        """Stream the answer to `text`; the turn is kept in the history even if stopped early."""
        stats = stats if stats is not None else GenerationStats()
        prompt = encode_prompt(self.tokenizer, self.messages + [{"role": "user", "content": text}], self.template, self.system)
        ids = prompt.ids
        keep = min(common_prefix(ids, self.cached), len(ids) - 1)  # at least one token to prefill
        for layer in self.cache:
            layer.trim(layer.offset - keep)
        reply: list[str] = []
        started = False
        try:
            for piece in stream_tokens(self.model, self.tokenizer, ids[keep:], max_tokens, params=self.params,
                                       cache=self.cache, stats=stats, stop_ids=prompt.stop_ids, stop_strings=self.stop_strings,
                                       past=ids[:keep]):
                started = True
                reply.append(piece)
                yield piece
            started = True
        finally:
            if started:  # an answer, complete or interrupted (a refused prompt leaves no turn)
                self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
            self.cached = (ids + stats.sampled)[: self.cache[0].offset]
