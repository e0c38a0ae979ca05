"""Samplers: llama.cpp's sampler chain, as small pure functions compiled together.

The chain, in llama.cpp's order (`common/sampling.cpp`) and with its meaning
(`src/llama-sampler.cpp`):

    logit bias → penalties (repeat, frequency, presence) over the last `repeat_last_n` tokens
    → [token mask] → top-k → top-p → min-p → temperature → draw

The token mask is a constraint's (`constraints.py`): the tokens a grammar does not allow next
are removed before the filters, as llama.cpp applies its grammar.

Like llama.cpp, top-k shrinks the candidates to the k best tokens, sorted, and the later
filters only look at those (a removed candidate gets logit -inf); top-p and min-p use the
probabilities before the temperature. Temperature ≤ 0 is greedy: the most likely token after
the bias and the penalties (llama.cpp keeps only the top logit at that point; the filters
before it never remove the top token).

`make_sampler` compiles the whole chain for one `SamplingParams` with `mx.compile`: which steps
run and top-k are closed over, the float parameters are passed in as arrays, and a history
shorter than `repeat_last_n` is padded, so the chain is traced once per sampler and vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from .errors import MlxLlamaError

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """llama.cpp's sampling parameters, with its defaults (`common/common.h`)."""

    temp: float = 0.8  # ≤ 0: greedy
    top_k: int = 40  # ≤ 0: off
    top_p: float = 0.95  # ≥ 1.0: off
    min_p: float = 0.05  # ≤ 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # tokens the penalties look back over, prompt included; 0: off
    frequency_penalty: float = 0.0  # subtracted once per occurrence; 0.0: off
    presence_penalty: float = 0.0  # subtracted once if the token occurs; 0.0: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit (-inf bans)
    seed: int | None = None  # None: drawn from MLX's global generator (see `mx.random.seed`)

    @property
    def penalty_last_n(self) -> int:
        """How many recent tokens `sample` wants as `history`: 0 when no penalty is on."""
        on = self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        return self.repeat_last_n if on else 0


# ---- the filters: pure functions of 1-D logits --------------------------------------------


def apply_logit_bias(logits: mx.array, ids: mx.array, bias: mx.array) -> mx.array:
    """Add `bias[i]` to the logit of token `ids[i]` (ids distinct)."""
    return logits.at[ids].add(bias)


def apply_penalties(logits: mx.array, history: mx.array, weights: mx.array, repeat, frequency, presence) -> mx.array:
    """llama.cpp's penalties for each token that occurs in `history`, where it occurs `count` times:
    its logit is divided by `repeat` if positive, else multiplied by it, then
    `count * frequency + presence` is subtracted.

    history: token ids; weights: 1 for a real entry, 0 for padding (a padding entry repeats a
    real id, so it is counted for nothing and written with the same value).
    """
    counts = ((history[:, None] == history[None, :]) * weights).sum(axis=1)
    seen = logits[history]
    seen = mx.where(seen <= 0, seen * repeat, seen / repeat)
    seen = seen - (counts * frequency + presence)
    return mx.put_along_axis(logits, history, seen, axis=0)


def top_k(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest logits, sorted descending, and their token ids (exactly k, as llama.cpp)."""
    ids = _k_largest(logits, k)
    vals = logits[ids]
    order = mx.argsort(-vals)
    return vals[order], ids[order]


def sort_descending(logits: mx.array) -> tuple[mx.array, mx.array]:
    """All logits sorted descending, and their token ids (top-p without top-k needs the order)."""
    ids = mx.argsort(-logits)
    return logits[ids], ids


def top_p(logits: mx.array, p: mx.array | float) -> mx.array:
    """Logits sorted descending: keep the most likely tokens up to and including the one whose
    cumulative probability reaches p; the first always stays."""
    before = mx.cumsum(mx.softmax(logits), inclusive=False)
    keep = (before < p) | (mx.arange(logits.size) == 0)
    return mx.where(keep, logits, NEG_INF)


def min_p(logits: mx.array, p: mx.array) -> mx.array:
    """Drop tokens whose probability is below p times the most likely token's."""
    return mx.where(logits >= logits.max() + mx.log(p), logits, NEG_INF)


def temperature(logits: mx.array, temp: mx.array | float) -> mx.array:
    return logits / temp


def apply_token_mask(logits: mx.array, words: mx.array) -> mx.array:
    """Keep the tokens whose bit is set in `words`, the rest get -inf.

    words: (⌈V/32⌉,) uint32, token i is bit i % 32 of word i // 32 (llguidance's bitmask).
    """
    bits = (words[:, None] >> mx.arange(32, dtype=mx.uint32)) & 1  # (⌈V/32⌉, 32)
    return mx.where(bits.reshape(-1)[: logits.size].astype(mx.bool_), logits, NEG_INF)


def _k_largest(x: mx.array, k: int) -> mx.array:
    """Ids of the k largest entries of x, in no order.

    A full partition of a 50k vocabulary is slow on the CPU, so x is cut into blocks: a token
    among the k largest has fewer than k tokens above it, so fewer than k blocks have a larger
    maximum than its block's. The k blocks with the largest maxima therefore hold k largest
    tokens, and only those k × block entries are partitioned.
    """
    n = x.size
    block = max((b for b in range(1, int(math.sqrt(n / k)) + 1) if n % b == 0), default=1)
    if block < 4:
        return mx.argpartition(-x, k - 1)[:k]
    best = mx.argpartition(-x.reshape(-1, block).max(axis=1), k - 1)[:k]
    # the token ids of those blocks, from a constant table rather than `best * block`: a Python
    # number in the graph would be written into the C++ of a fused kernel, one build per block size
    ids = mx.array(np.arange(n, dtype=np.uint32).reshape(-1, block))[best].reshape(-1)
    return ids[mx.argpartition(-x[ids], k - 1)[:k]]


# ---- the chain ----------------------------------------------------------------------------

# The float parameters go into the compiled chain as arrays: MLX's CPU compiler writes constants
# into the C++ of its fused kernels, so a closed-over temperature would build new kernels (a
# second or so, once per machine) for every new value.
FLOAT_PARAMS = ("temp", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty")


def _validate(params: SamplingParams) -> None:
    if params.repeat_last_n < 0:
        raise MlxLlamaError(f"repeat_last_n must be ≥ 0, not {params.repeat_last_n}")
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise MlxLlamaError(f"seed must be in 0 … 2^64-1, not {params.seed}")
    if params.penalty_last_n and not params.repeat_penalty > 0:
        raise MlxLlamaError(f"repeat_penalty must be > 0, not {params.repeat_penalty}")
    for name in FLOAT_PARAMS:
        if math.isnan(getattr(params, name)):
            raise MlxLlamaError(f"{name} is NaN")


def _bias_arrays(params: SamplingParams, vocab: int) -> tuple[mx.array, mx.array] | tuple[()]:
    if not params.logit_bias:
        return ()
    bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab]
    if bad:
        raise MlxLlamaError(f"logit_bias: token {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    ids = mx.array([int(t) for t in params.logit_bias], mx.int32)
    return ids, mx.array([float(b) for b in params.logit_bias.values()], mx.float32)


def _chain(params: SamplingParams, f: dict, logits: mx.array, bias, window, mask=()) -> tuple[mx.array, mx.array | None]:
    """The chain up to the draw. Returns the surviving logits (-inf: removed) and their token
    ids (None: all tokens in vocabulary order). params decides which steps run; f holds its
    float parameters as arrays; bias: (ids, values) or (); window: (history, weights) or ();
    mask: (token bitmask,) or ()."""
    x = logits.reshape(-1).astype(mx.float32)
    if bias:
        x = apply_logit_bias(x, *bias)
    if window:
        x = apply_penalties(x, *window, f["repeat_penalty"], f["frequency_penalty"], f["presence_penalty"])
    if mask:
        # after bias and penalties, which leave -inf at -inf: the same as masking first (as
        # llama.cpp does), except that a +inf bias on a masked token cannot make a NaN
        x = apply_token_mask(x, *mask)
    if params.temp <= 0:  # greedy: only the top token is left
        best = mx.argmax(x, keepdims=True)
        return x[best], best
    ids = None
    if 0 < params.top_k < x.size:
        x, ids = top_k(x, params.top_k)
    if params.top_p < 1.0:
        if ids is None:
            x, ids = sort_descending(x)
        x = top_p(x, f["top_p"])
    if params.min_p > 0.0:
        x = min_p(x, f["min_p"])
    if params.temp != 1.0:
        x = temperature(x, f["temp"])
    return x, ids


def _float_params(params: SamplingParams) -> dict:
    return {name: mx.array(getattr(params, name), mx.float32) for name in FLOAT_PARAMS}


def _window(history: mx.array | None, n: int, ones: dict) -> tuple[mx.array, mx.array] | tuple[()]:
    """The last n tokens of `history`, padded at the front to n (weights 0), so that the
    compiled chain sees one shape while the history fills up."""
    if not n or history is None or history.size == 0:
        return ()
    history = history.reshape(-1).astype(mx.int32)
    m = history.size
    if m >= n:
        if n not in ones:
            ones[n] = mx.ones((n,), mx.float32)
        return (history[-n:] if m > n else history), ones[n]
    pad = mx.broadcast_to(history[:1], (n - m,))
    weights = mx.array(np.arange(n) >= n - m, mx.float32)
    return mx.concatenate([pad, history]), weights


def process_logits(logits: mx.array, history: mx.array | None, params: SamplingParams,
                   mask: mx.array | None = None) -> mx.array:
    """The chain up to the draw, as full (1, V) float32 logits: removed tokens at -inf, the
    rest after bias, penalties and temperature. At temperature ≤ 0 only the top token stays.
    mask: a constraint's token bitmask (see `apply_token_mask`), or None."""
    _validate(params)
    vocab = logits.shape[-1]
    window = _window(history, params.penalty_last_n, {})
    masks = () if mask is None else (mask,)
    vals, ids = _chain(params, _float_params(params), logits, _bias_arrays(params, vocab), window, masks)
    if ids is None:
        return vals[None]
    return mx.put_along_axis(mx.full((vocab,), NEG_INF, mx.float32), ids, vals, axis=0)[None]


def make_sampler(params: SamplingParams) -> Callable[..., mx.array]:
    """A function (logits (1, V), recent tokens (n,) int32 or None, mask or None) → next token (1,) int32.

    `history` should hold the last `params.penalty_last_n` tokens, prompt included (it is
    ignored when no penalty is on; a longer one is cut, a shorter one is fine). `mask`: a
    constraint's bitmask of the tokens allowed (`apply_token_mask`).
    Reproducible for a given seed: the draws follow `mx.random.key(seed)`, split once per token.
    """
    _validate(params)
    seed = params.seed if params.seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
    key = mx.random.key(seed)
    f = _float_params(params)
    n_hist = params.penalty_last_n
    ones: dict = {}
    compiled = {}

    def draw(key, f, logits, bias, mask, *window):
        x, ids = _chain(params, f, logits, bias, window, mask)
        if params.temp <= 0:
            return ids.astype(mx.int32), key
        key, sub = mx.random.split(key)
        i = mx.random.categorical(x, key=sub, shape=(1,))
        return (i if ids is None else ids[i]).astype(mx.int32), key

    def sample(logits: mx.array, history: mx.array | None = None, mask: mx.array | None = None) -> mx.array:
        nonlocal key
        vocab = logits.shape[-1]
        if vocab not in compiled:
            compiled[vocab] = (mx.compile(draw), _bias_arrays(params, vocab))
        fn, bias = compiled[vocab]
        masks = () if mask is None else (mask,)
        token, key = fn(key, f, logits, bias, masks, *_window(history, n_hist, ones))
        return token

    return sample
