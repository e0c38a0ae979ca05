"""Perplexity by llama.cpp's method (`llama-perplexity`).

The text is tokenized once (BOS as the file asks); it is cut into chunks of `ctx` tokens, each
evaluated from an empty cache with its first token replaced by BOS when the vocabulary adds
one; only the second half of each chunk is scored (every token then has at least ctx/2 tokens
of context). PPL = exp(mean NLL); the ± is the standard error of that mean, times PPL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .errors import MlxLlamaError, NonFiniteError


@dataclass
class Perplexity:
    nll_sum: float = 0.0
    nll2_sum: float = 0.0  # sum of squares, for the error estimate
    count: int = 0  # tokens scored
    chunks: int = 0

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / self.count)

    @property
    def error(self) -> float:
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.value if var > 0 and self.count > 1 else 0.0


def chunk_nll(model, tokens: list[int]) -> mx.array:
    """Negative log-likelihood of tokens[first + 1:] given their prefixes, first = len // 2."""
    first = len(tokens) // 2
    h = model.hidden(mx.array([tokens]))
    logits = model.logits(h[:, first:-1]).astype(mx.float32)  # (1, n - first - 1, V)
    targets = mx.array(tokens[first + 1 :])[None, :, None]
    logprobs = mx.take_along_axis(logits, targets, axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
    return -logprobs[0]


def perplexity(
    model,
    tokenizer,
    text: str,
    ctx: int = 512,
    chunks: int | None = None,
    on_chunk: Callable[[Perplexity], None] | None = None,
) -> Perplexity:
    tokens = tokenizer.encode(text, add_special=True, parse_special=False)
    if ctx < 4:
        raise MlxLlamaError(f"--ctx {ctx} is too small (at least 4)")
    if len(tokens) < 2 * ctx:
        raise MlxLlamaError(f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}")
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    result = Perplexity()
    for i in range(n_chunks):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if tokenizer.add_bos:
            chunk[0] = tokenizer.bos_id
        nll = np.array(chunk_nll(model, chunk), dtype=np.float64)  # summed in float64, as llama.cpp does
        if not np.isfinite(nll).all():  # a NaN would make every later estimate NaN
            raise NonFiniteError(f"the model computed NaN or infinite logits in chunk {i + 1}: its weights or "
                                 "settings are broken, or its activations overflow the compute dtype")
        result.nll_sum += float(nll.sum())
        result.nll2_sum += float((nll * nll).sum())
        result.count += nll.size
        result.chunks += 1
        if on_chunk:
            on_chunk(result)
    return result
