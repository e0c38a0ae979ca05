"""Pipeline parallelism: each rank holds a run of consecutive layers; the activations pass from
rank to rank.

    rank 0: embed → layers [0, a) ─▶ rank 1: layers [a, b) ─▶ … ─▶ rank N−1: layers [y, L)
       ▲                                                                         │
       └── output norm, vocabulary projection, sampling ◀── final hidden state ──┘

Rank 0 holds both ends of the vocabulary: a tied embedding table (SmolLM2, Gemma, Llama-3.2)
is then held once, and the logits are where the output is printed and the token sampled. The
last rank sends its hidden state back to rank 0 — the ring closes, so each hop is between
neighbours of the ring backend. Layers are assigned by their bytes, rank 0 counting the
vocabulary ends too (`split_layers`).

Activations move with `mx.distributed.send/recv`; MLX's NCCL backend has neither, so there each
hop is an `all_sum` to which every rank but the sender adds zeros (`World.share`).
"""

from __future__ import annotations

import mlx.core as mx

from .base import DistributedModel
from .world import SameOnEveryRank


def split_layers(layer_bytes: list[int], ends_bytes: int, size: int) -> list[range]:
    """Consecutive layers for each of `size` ranks, at least one each, so that the largest
    rank's bytes are the fewest; rank 0 also holds `ends_bytes` (the vocabulary ends)."""
    n = len(layer_bytes)
    if size > n:
        raise SameOnEveryRank(f"a pipeline over {size} ranks needs at least {size} layers; the model has {n}")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    # best[r][j]: the smallest possible largest load when ranks 0..r hold layers [0, j)
    best = [[None] * (n + 1) for _ in range(size)]
    cut = [[0] * (n + 1) for _ in range(size)]
    for j in range(1, n + 1):
        best[0][j] = ends_bytes + prefix[j]
    for r in range(1, size):
        for j in range(r + 1, n + 1):
            best[r][j], cut[r][j] = min((max(best[r - 1][i], prefix[j] - prefix[i]), i) for i in range(r, j))
    bounds, j = [n], n
    for r in range(size - 1, 0, -1):
        j = cut[r][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[r], bounds[r + 1]) for r in range(size)]


class PipelineModel(DistributedModel):
    """Rank `world.rank`'s stage: `inner` holds its layers (and, on rank 0, the vocabulary ends)."""

    def __init__(self, inner, config, world, layers: list[range]):
        super().__init__(inner, config, world)
        self.layers = layers

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        """Every rank returns an array of the hidden states' shape: the final hidden states on the
        last rank, elsewhere what this rank sent (which orders its later collectives)."""
        self.world.watchdog.beat()
        rank, size = self.world.rank, self.world.size
        shape = (*tokens.shape, self.config.hidden_size)
        if rank == 0:
            h = self.inner.embed(tokens)
        else:  # stands in until the previous stage's activations arrive
            h = mx.depends(mx.zeros(shape, self.dtype), tokens)
        for stage in range(size):
            if stage == rank:
                for i, block in enumerate(self.inner.blk):
                    h = block(h, cache[i] if cache is not None else None)
            if stage + 1 < size:
                h = self.hop(h, stage, stage + 1)
        return h

    def logits(self, h: mx.array) -> mx.array:
        """h: hidden states as `hidden` returned them (or positions of them). The last rank's
        go back to rank 0, which returns the logits; other ranks return zeros of their shape."""
        h = self.hop(h, self.world.size - 1, 0)
        if self.world.rank == 0:
            return self.inner.logits(h)
        return mx.broadcast_to(mx.depends(mx.zeros((1,), self.dtype), h), (*h.shape[:-1], self.config.vocab_size))

    def hop(self, x: mx.array, src: int, dst: int) -> mx.array:
        """Rank `src`'s `x` arrives on rank `dst` (every rank calls this, at the same point)."""
        rank, group = self.world.rank, self.world.group
        if not self.world.point_to_point:
            return self.world.share(x, root=src)
        if rank == src:
            sent = mx.distributed.send(x, dst, group=group)
            # Scheduled now, so that it precedes anything this rank receives later in program
            # order: a recv has no inputs to order it, and the ring's sends block until received.
            mx.async_eval(sent)
            return sent
        if rank == dst:
            return mx.distributed.recv(x.shape, x.dtype, src, group=group)
        return x

    def describe(self) -> str:
        mine = self.layers[self.world.rank]
        ends = ", embedding and output" if self.world.rank == 0 else ""
        return f"pipeline, rank {self.world.rank} of {self.world.size}: layers {mine.start}-{mine.stop - 1}{ends}"
