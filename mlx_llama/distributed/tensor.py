"""Tensor parallelism: every rank runs every layer on its share of the heads and FFN units.

The q/k/v, gate and up projections are "all-to-sharded" as in `mlx.nn.layers.distributed`
(each rank holds the rows of its heads or units: no communication). attn_output and ffn_down
bring the shares back together, in one of two ways (`reduce`):

- "gather" (the default): each rank holds some of the layer's *rows*; the ranks' inputs are
  gathered into the whole vector and the outputs gathered after the product. Every output is one
  whole dot product, summed on one rank in the order one process sums it, so the logits equal the
  single-process model's to the bit on the CPU. Two `all_gather`s per block half.
- "sum": each rank holds the matching *columns*, and one `all_sum` per block half adds the
  partial products (mlx-lm's layout: half the collectives, but float sums in another order:
  max |Δlogit| ~1e-4 on SmolLM2 over 3 ranks).

The vocabulary is split by rows: a lookup sums each rank's rows (zeros for tokens it does not
hold), the output projection gathers each rank's logits.

Rows and columns are read from the file as they are stored, so every weight form stays exact
(see `load.read_part`); a split must keep each query head with its key/value head, so the
key/value head count must be a multiple of the rank count.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from ..architectures import ModelConfig
from .base import DistributedModel, Part
from .world import SameOnEveryRank, World

# FFN units are split in multiples of MLX's affine group (32), or of a Q2_K/Q6_K super-block
# (256) when ffn_down is kept in those blocks: ffn_down's columns then stay in their compact
# form (`load.trim_columns`).
GROUP, SUPER_BLOCK = 32, 256


class TensorSplit:
    """Which heads, FFN units and vocabulary rows rank `rank` of `size` holds; FFN units in
    multiples of `unit` where the size allows."""

    def __init__(self, cfg: ModelConfig, rank: int, size: int, unit: int = GROUP, reduce: str = "gather"):
        if cfg.num_kv_heads % size:
            raise SameOnEveryRank(
                f"tensor parallelism over {size} ranks needs a key/value head count divisible by {size}; "
                f"this model has {cfg.num_kv_heads} key/value heads ({cfg.num_heads} query heads): "
                f"use {_divisors(cfg.num_kv_heads)} ranks, or --pipeline")
        check_reduce(reduce)
        self.cfg, self.rank, self.size, self.reduce = cfg, rank, size, reduce
        per_kv = cfg.num_kv_heads // size
        self.kv_heads = (rank * per_kv, (rank + 1) * per_kv)
        group = cfg.num_heads // cfg.num_kv_heads  # query heads per key/value head stay together
        self.heads = (self.kv_heads[0] * group, self.kv_heads[1] * group)
        self.unit = unit
        self.units = _aligned_share(cfg.intermediate_size, rank, size, unit)
        self.vocab, self.vocab_width = _equal_share(cfg.vocab_size, rank, size)
        self.hidden, self.hidden_width = _equal_share(cfg.hidden_size, rank, size)  # output rows ("gather")
        if self.vocab[0] == self.vocab[1] or self.units[0] == self.units[1] or self.hidden[0] == self.hidden[1]:
            raise SameOnEveryRank(f"the model is too small to split over {size} ranks")

    def local_config(self) -> ModelConfig:
        """The shapes this rank's modules take (heads, FFN units and vocabulary rows it holds)."""
        cfg = self.cfg
        return dataclasses.replace(
            cfg, num_heads=cfg.num_heads // self.size, num_kv_heads=cfg.num_kv_heads // self.size,
            intermediate_size=self.units[1] - self.units[0], vocab_size=self.vocab[1] - self.vocab[0])

    def part(self, name: str) -> Part | None:
        """What this rank reads of GGUF tensor `name` (None: all of it)."""
        cfg, hd = self.cfg, self.cfg.head_dim
        role = name.split(".")[-2]  # 'blk.3.attn_q.weight' → 'attn_q'; 'output.bias' → 'output'
        q = (self.heads[0] * hd, self.heads[1] * hd)
        kv = (self.kv_heads[0] * hd, self.kv_heads[1] * hd)
        f0, f1 = self.units
        if role in ("token_embd", "output"):
            return Part(rows=(self.vocab,))
        if role == "attn_q":
            return Part(rows=(q,))
        if role in ("attn_k", "attn_v"):
            return Part(rows=(kv,))
        if role == "attn_qkv":  # [q; k; v] rows
            k0, v0 = cfg.q_dim, cfg.q_dim + cfg.kv_dim
            return Part(rows=(q, (k0 + kv[0], k0 + kv[1]), (v0 + kv[0], v0 + kv[1])))
        if role == "ffn_gate" or (role == "ffn_up" and not cfg.arch.fused_gate_up):
            return Part(rows=((f0, f1),))
        if role == "ffn_up":  # [gate; up] rows
            n = cfg.intermediate_size
            return Part(rows=((f0, f1), (n + f0, n + f1)))
        if role in ("attn_output", "ffn_down") and self.reduce == "gather":
            return Part(rows=(self.hidden,))  # weight and bias: this rank's outputs
        if name.endswith(".weight") and role == "attn_output":
            return Part(cols=q)
        if name.endswith(".weight") and role == "ffn_down":
            return Part(cols=(f0, f1))
        return None  # norms, RoPE factors, the biases added after a sum: every rank holds them

    def widths(self, name: str) -> list[int]:
        """Every rank's share of the input of `name` ("attn_output" or "ffn_down"), in rank order."""
        if name == "attn_output":
            return [self.cfg.q_dim // self.size] * self.size
        shares = [_aligned_share(self.cfg.intermediate_size, r, self.size, self.unit) for r in range(self.size)]
        return [b - a for a, b in shares]


REDUCE = ("gather", "sum")


def check_reduce(reduce: str) -> None:
    """A one-line error, the same on every rank, for a reduction other than REDUCE's."""
    if reduce not in REDUCE:
        raise SameOnEveryRank(f"unknown tensor-parallel reduction {reduce!r} (expected {' or '.join(REDUCE)})")


def _equal_share(n: int, rank: int, size: int) -> tuple[tuple[int, int], int]:
    """Rank `rank`'s part of n when all shares are equal but the last (gathered pieces then need
    no reordering), and the share's width."""
    width = -(-n // size)
    return (min(rank * width, n), min((rank + 1) * width, n)), width


def _divisors(n: int) -> str:
    return " or ".join(str(d) for d in range(2, n + 1) if n % d == 0) or "no"


def _aligned_share(n: int, rank: int, size: int, unit: int) -> tuple[int, int]:
    """Rank `rank`'s part of n, cut at multiples of `unit` (of 1 where that cannot be done)."""
    unit = next((u for u in (unit, GROUP) if n % u == 0 and n // u >= size), 1)
    blocks = n // unit
    return blocks * rank // size * unit, blocks * (rank + 1) // size * unit


class AllSumLinear(nn.Module):
    """A layer holding some of its input columns: the ranks' partial products summed with one
    `all_sum`, the bias (if any) added once, after the sum."""

    def __init__(self, layer: nn.Module, group: mx.distributed.Group):
        super().__init__()
        if "bias" in layer:
            self.bias = layer.pop("bias")
        self.layer = layer
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(self.layer(x), group=self.group)
        return y + self["bias"] if "bias" in self else y


class GatherLinear(nn.Module):
    """A layer holding some of its output rows: the ranks' input shares gathered into the whole
    vector, this rank's outputs computed from it, and every rank's outputs gathered."""

    def __init__(self, layer: nn.Module, world: World, inputs: list[int], outputs: int, total: int):
        super().__init__()
        self.layer, self.world = layer, world
        self.inputs, self.outputs, self.total = inputs, outputs, total

    def __call__(self, x: mx.array) -> mx.array:
        return gather_last(self.world, self.layer(gather_last(self.world, x, self.inputs)), [self.outputs], self.total)


def gather_last(world: World, x: mx.array, widths: list[int], total: int | None = None) -> mx.array:
    """(..., this rank's share) → (..., every rank's share in rank order) on every rank. `widths`:
    each rank's share; with `total`, all shares are `widths[0]` wide but the last, which ends at
    `total` (the equal split of `_equal_share`)."""
    lead = x.shape[:-1]
    width = max(widths)
    if x.shape[-1] < width:  # pad to the widest share: every rank sends the same shape
        x = mx.pad(x, [(0, 0)] * len(lead) + [(0, width - x.shape[-1])])
    every = mx.moveaxis(world.all_gather(x), 0, -2)  # (..., ranks, width)
    if total is not None:
        return every.reshape(*lead, -1)[..., :total]
    if len(set(widths)) == 1:
        return every.reshape(*lead, -1)
    return mx.concatenate([every[..., r, :w] for r, w in enumerate(widths)], axis=-1)


class VocabRows(nn.Module):
    """Rows [start, stop) of the vocabulary: an embedding table (tied or not) or the output
    projection, and the collective that makes each whole again."""

    def __init__(self, layer: nn.Module, split: TensorSplit, world: World, output: bool):
        super().__init__()
        self.layer, self.world, self.output = layer, world, output
        self.start, self.stop = split.vocab
        self.width, self.vocab = split.vocab_width, split.cfg.vocab_size

    def __call__(self, x: mx.array) -> mx.array:
        return self.gather(self.layer(x)) if self.output else self.lookup(x)

    def lookup(self, ids: mx.array) -> mx.array:
        """(B, T) token ids → (B, T, hidden): each rank adds the rows it holds, zeros elsewhere."""
        local = ids - self.start
        held = (local >= 0) & (local < self.stop - self.start)
        rows = self.layer(mx.where(held, local, 0))
        return mx.distributed.all_sum(mx.where(held[..., None], rows, 0), group=self.world.group)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.gather(self.layer.as_linear(h))

    def gather(self, part: mx.array) -> mx.array:
        """(..., this rank's rows) logits → (..., vocab), the same on every rank."""
        return gather_last(self.world, part, [self.width], self.vocab)


def row_layers(model: nn.Module, split: TensorSplit) -> None:
    """For "gather": make attn_output and ffn_down the shape of this rank's rows of the whole
    layer (all its inputs), before the weights are filled in."""
    from ..model import linear

    cfg, rows = split.cfg, split.hidden[1] - split.hidden[0]
    for block in model.blk:
        block.attn.attn_output = linear(cfg, "attn_output", cfg.q_dim, rows)
        block.ffn.ffn_down = linear(cfg, "ffn_down", cfg.intermediate_size, rows)


def shard_modules(model: nn.Module, split: TensorSplit, world: World) -> None:
    """Put the collectives in a model built from this rank's shares (`split.local_config()`)."""
    group = world.group
    for block in model.blk:
        if split.reduce == "gather":
            rows, hidden = split.hidden_width, split.cfg.hidden_size
            block.attn.attn_output = GatherLinear(block.attn.attn_output, world, split.widths("attn_output"), rows, hidden)
            block.ffn.ffn_down = GatherLinear(block.ffn.ffn_down, world, split.widths("ffn_down"), rows, hidden)
        else:
            block.attn.attn_output = AllSumLinear(block.attn.attn_output, group)
            block.ffn.ffn_down = AllSumLinear(block.ffn.ffn_down, group)
    model.token_embd = VocabRows(model.token_embd, split, world, output=False)
    if "output" in model:
        model.output = VocabRows(model.output, split, world, output=True)


class TensorParallelModel(DistributedModel):
    """Every rank runs the whole graph on its shares; the collectives live in the layers."""

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        self.world.watchdog.beat()
        return self.inner.hidden(tokens, cache)

    def logits(self, h: mx.array) -> mx.array:
        return self.inner.logits(h)

    def describe(self) -> str:
        s = self.split
        return (f"tensor parallel, rank {self.world.rank} of {self.world.size}: query heads {s.heads[0]}-{s.heads[1] - 1}, "
                f"FFN units {s.units[0]}-{s.units[1] - 1}, vocabulary rows {s.vocab[0]}-{s.vocab[1] - 1}")
