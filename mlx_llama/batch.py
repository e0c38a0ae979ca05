"""Several sequences decoded together (continuous batching), each with its own KV cache,
sampler and stop rules.

A decode step feeds one token per sequence through the model as one (rows, 1) batch: the linear
layers, where a CPU spends its time, multiply all rows at once (one matrix product instead of
one matrix-vector product per sequence), and attention runs per row against that sequence's own
cache, so sequences of any lengths can share a step. Sequences join and leave between steps.

A sequence under a constraint (`constraints.TokenMatcher`) draws each token under its own mask;
token n+1's mask needs token n, so a step queues the forward pass first and each such row's
matcher takes its last token and computes its next mask on the CPU while the pass runs.

The batch always has `rows` rows, idle ones padded: BLAS picks its kernel by the matrix shape,
and a different kernel sums in another order, so a fixed shape is what makes a sequence's
tokens independent of how many others run beside it. With one row the step is the same
computation as `generation.generate_tokens`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx

from .errors import MlxLlamaError
from .generation import PREFILL_CHUNK, GenerationStats, TokenSampler, TokenText, prefill_chunks, token_budget
from .sample import SamplingParams

if TYPE_CHECKING:
    from .constraints import TokenMatcher
    from .model import Model
    from .tokenizer import Tokenizer


class Sequence:
    """One prompt's generation, stepped from outside: `prefill` until it returns the first
    token, then one token per `Batch.step`; `add` turns each token into text.

    ids: the tokens to prefill after the `cache[0].offset` tokens the cache already holds
    (`past`, which the penalties see too). The first `max_tokens` sampled tokens are generated
    at most (fewer when the context is reached: `stats.finish_reason` says which).
    matcher: a constraint's state for this sequence; it ends once the matcher is finished.
    `error` is set (one line) when the constraint failed; the sequence then draws no more.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, ids: list[int], max_tokens: int, *,
                 params: SamplingParams, cache, stop_ids: set[int], stop_strings=(), past: list[int] = (),
                 context: int | None = None, stats: GenerationStats | None = None,
                 matcher: TokenMatcher | None = None):
        self.model, self.cache = model, cache
        self.stats = stats if stats is not None else GenerationStats()
        context = context if context is not None else model.config.context_length
        self.max_tokens = token_budget(context, cache[0].offset, len(ids), max_tokens, self.stats, "the context")
        self.sampler = TokenSampler(params, list(past) + list(ids))
        self.text = TokenText(tokenizer, stop_ids, stop_strings, self.stats, time.perf_counter())
        self._prefill = prefill_chunks(model, mx.array(ids, mx.int32), cache)
        self.next: mx.array | None = None  # (1,) the sampled token the next step feeds in
        self.matcher, self.error = matcher, None

    def prefill(self) -> int | None:
        """Run the next chunk (`PREFILL_CHUNK` tokens) of the prompt; once it is all in, the
        first token, else None."""
        logits = next(self._prefill)
        if logits is None:
            return None
        if self.matcher is None:
            self.next = self.sampler(logits)
            return self.next.item()
        mx.async_eval(logits)  # the first mask is computed while the last chunk runs
        self.next = self.sampler(logits, self.matcher.mask())
        token = self.next.item()
        self.matcher.advance(token)
        self.stats.constraint_seconds = self.matcher.seconds
        return token

    def draw(self, logits: mx.array, taken: bool) -> None:
        """Queue the next token (`next`) from this row's logits (1, V). Under a constraint the
        matcher first takes the token queued before (unless `taken`: the first token, which
        `prefill` gave it); a finished or failed constraint draws nothing more."""
        if self.matcher is None:
            self.next = self.sampler(logits)
            return
        try:
            if not taken:
                self.matcher.advance(self.next.item())
            if not self.matcher.finished:
                self.next = self.sampler(logits, self.matcher.mask())
        except MlxLlamaError as e:
            self.error = str(e)
        self.stats.constraint_seconds = self.matcher.seconds

    def add(self, token: int) -> str:
        """The text this sampled token completes; afterwards `done` says whether to stop."""
        text = self.text.add(token)
        finished = self.matcher is not None and self.matcher.finished
        if not self.text.done and (finished or len(self.stats.sampled) >= self.max_tokens):
            if finished:  # its end-of-generation token, though not one of stop_ids
                self.stats.finish_reason = "stop"
            text += self.text.close()
        return text

    @property
    def done(self) -> bool:
        return self.text.done


class Batch:
    """The sequences being decoded: `rows` places, a step advances all of them by one token.

    Steps are pipelined as in `generate_tokens`: a step queues the next forward pass
    (`mx.async_eval`) before it reads the tokens of the one before, so building one step's
    graph overlaps computing the previous one. A token handed out has therefore already been
    fed to the model: a sequence's cache holds its prompt and every token it handed out.
    """

    def __init__(self, model: Model, rows: int):
        self.model = model
        self.rows: list[Sequence | None] = [None] * rows
        self.fresh: set[int] = set()  # rows whose `next` is the first token, already handed out by `prefill`
        self.pad = mx.zeros((1,), mx.int32)

    def __len__(self) -> int:
        return sum(s is not None for s in self.rows)

    def add(self, seq: Sequence) -> None:
        """A prefilled sequence joins at the next step."""
        row = self.rows.index(None)
        self.rows[row] = seq
        self.fresh.add(row)

    def remove(self, seq: Sequence) -> None:
        """The sequence leaves; a token it has queued is dropped."""
        row = self.rows.index(seq)
        self.rows[row] = None
        self.fresh.discard(row)

    def step(self) -> list[tuple[Sequence, int]]:
        """Queue one more token for every sequence; return the tokens queued by the step
        before, as (sequence, token) — none for a sequence that just joined, or whose constraint
        failed in this step (its `error` says why)."""
        live = [(i, s) for i, s in enumerate(self.rows) if s is not None]
        if not live:
            return []
        tokens = mx.concatenate([s.next if s is not None else self.pad for s in self.rows])  # (rows,)
        caches = [[s.cache[layer] if s is not None else None for s in self.rows] for layer in range(len(self.model.blk))]
        logits = self.model(tokens[:, None], caches)[:, -1, :]  # (rows, vocab)
        if any(s.matcher is not None for _, s in live):
            mx.async_eval(logits)  # the pass runs while the matchers compute their masks
        handed = []
        for i, seq in live:
            previous = seq.next
            seq.draw(logits[i : i + 1], taken=i in self.fresh)
            if i not in self.fresh and seq.error is None:
                handed.append((seq, previous))
        self.fresh.clear()
        mx.async_eval([s.next for _, s in live])
        return [(seq, token.item()) for seq, token in handed]


__all__ = ["Batch", "Sequence", "PREFILL_CHUNK"]
