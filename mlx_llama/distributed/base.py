"""What both ways of spreading a model share: the part of a tensor a rank reads, and the model
interface the rest of mlx_llama (generation, chat, perplexity) uses, on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..architectures import ModelConfig
from .world import World


@dataclass(frozen=True)
class Part:
    """The part of a GGUF tensor one rank reads: these row ranges, stacked in order (all rows when
    empty), of these columns (all when None). For a vector, its rows are its elements."""

    rows: tuple[tuple[int, int], ...] = ()
    cols: tuple[int, int] | None = None


class DistributedModel:
    """`model.Model`'s interface over the ranks of a run (subclasses give `hidden` and `logits`):
    every rank calls `hidden`, `logits`
    and the sampler at the same points, in the same order, and so takes part in the same
    collectives. Rank 0 holds the logits; the sampled token is shared from it (`shared_sampler`),
    so every rank goes on with the same token and stops at the same point.

    inner: this rank's `model.Model`, built from its share of the weights; config: the whole
    model's."""

    def __init__(self, inner: nn.Module, config: ModelConfig, world: World):
        self.inner, self.config, self.world = inner, config, world
        self.dtype = inner.dtype
        self.cpu_dequantized = False

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        return self.logits(self.hidden(tokens, cache))

    def make_cache(self):
        return self.inner.make_cache()

    def shared_sampler(self, sample):
        """`sample` run on rank 0 only; its token reaches every rank (`generation` asks for this)."""

        def shared(logits: mx.array, history: mx.array | None = None, mask: mx.array | None = None) -> mx.array:
            if self.world.rank == 0:
                token = sample(logits, history, mask)
            else:  # the shape, and an order: after this rank's part of the step
                token = mx.depends(mx.zeros((1,), mx.int32), logits)
            return self.world.share(token)

        return shared
