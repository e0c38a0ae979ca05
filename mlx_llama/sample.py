"""Samplers: small pure functions of the logits, chained by `make_sampler`.

Order and meaning follow llama.cpp's default chain: repetition penalty over the last
`repeat_last_n` tokens → top-k → top-p → min-p → temperature → draw. Temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    temp: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed


def apply_repeat_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """llama.cpp's rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    seen = logits[..., history]
    logits[..., history] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -k : -k + 1]
    return mx.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # keep token i if the mass before it is still below p (so the first token always stays)
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = before < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, NEG_INF)


def apply_min_p(logits: mx.array, p: float) -> mx.array:
    """Drop tokens whose probability is below p times the top token's."""
    if p <= 0.0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    return mx.where(logits < top + mx.log(mx.array(p, logits.dtype)), NEG_INF, logits)


def process_logits(logits: mx.array, history: mx.array | None, params: SamplingParams) -> mx.array:
    """The chain up to the draw: penalties, filters (removed tokens at -inf), then temperature."""
    logits = logits.astype(mx.float32)
    if params.repeat_penalty != 1.0 and history is not None and history.size:
        logits = apply_repeat_penalty(logits, history, params.repeat_penalty)
    if params.temp <= 0:
        return logits
    logits = apply_min_p(apply_top_p(apply_top_k(logits, params.top_k), params.top_p), params.min_p)
    return logits / params.temp


def make_sampler(params: SamplingParams) -> Callable[[mx.array, mx.array | None], mx.array]:
    """A function (logits (1, V), recent tokens (n,) or None) → next token (1,) int32."""
    key = mx.random.key(params.seed) if params.seed is not None else None

    def sample(logits: mx.array, history: mx.array | None) -> mx.array:
        nonlocal key
        logits = process_logits(logits, history, params)
        if params.temp <= 0:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        if key is None:
            return mx.random.categorical(logits).astype(mx.int32)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logits, key=sub).astype(mx.int32)

    return sample
