"""One decoded token as a compiled MLX function.

Building a decode step's graph op by op in Python costs the host ~4 ms per token on a 7B model
(~500 operations), more than the GPU needs to run it: decoding was host-bound. `mx.compile`
traces the step once and then replays the traced graph from C++, with MLX's elementwise
fusion on top. A traced graph must not depend on the position, so the step takes it as an
array: RoPE reads it as its offset, each layer's new key and value are written into the
`KVCache` buffer at it (in place: the step's caller holds no other reference to the buffer;
`mx.put_along_axis`: MLX's CUDA slice update at an array position copied ~1.5 MB per layer and
token), and attention runs over the whole buffer with a mask of the positions written so far
(and of the sliding window), made once per step. The buffers grow in the cache's steps of 256
positions outside the traced function; each capacity is traced once (~60 ms for SmolLM2 on the
CPU, ~150 ms the first time).

Used by `generation.generate_tokens` for one sequence where it was measured faster
(BENCHMARKS.md): NVIDIA GPUs (host time per step 4.7 → 1.0 ms on a 7B model) and the CPU
(SmolLM2: +8% tokens/s); on Metal the step runs op by op until it is measured there.
MLX_LLAMA_COMPILE=1 turns it on everywhere, =0 off.
"""

from __future__ import annotations

import os
import weakref

import mlx.core as mx

from . import layers
from .cache import KVCache, halves
from .model import Model, RoPE


def compiles(model) -> bool:
    """Whether `model`'s decode steps run compiled: a local model (not one spread over processes),
    on the CPU or an NVIDIA GPU unless MLX_LLAMA_COMPILE says."""
    switch = os.environ.get("MLX_LLAMA_COMPILE", "")
    measured = mx.default_device() == mx.cpu or mx.cuda.is_available()
    return (switch == "1" or (switch != "0" and measured)) and isinstance(model, Model)


def enabled(model, cache) -> bool:
    """Whether the next decode step with `cache` runs compiled: `compiles(model)`, one sequence's
    caches, their buffers made (by the prompt)."""
    return compiles(model) and all(type(c) is KVCache and c.kv is not None for c in cache)


class Slot:
    """A layer's cache inside the traced step: `KVCache`'s interface over its buffer `kv` (keys,
    then values), at a position held in an array (`offset`), with the mask attention needs over
    the whole buffer (`masks`: one per window size, shared by the layers)."""

    def __init__(self, kv: mx.array, position: mx.array, masks: dict):
        self.kv, self.offset, self.masks = kv, position, masks

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.write(mx.concatenate([keys, values.astype(keys.dtype)], axis=1))
        return halves(self.kv)

    def write(self, kv: mx.array) -> None:
        """The new token's key and value heads (1, 2 · kv_heads, 1, head_dim) into the buffer at the
        position: one scatter."""
        where = mx.broadcast_to(self.offset.reshape(1, 1, 1, 1), kv.shape)
        self.kv = mx.put_along_axis(self.kv, where, kv.astype(self.kv.dtype), axis=2)

    def attention_mask(self, window: int) -> mx.array:
        """(capacity,) bool: the positions the new token attends to."""
        if window not in self.masks:
            held = mx.arange(self.kv.shape[2])
            visible = held <= self.offset
            self.masks[window] = visible & (held > self.offset - window) if window else visible
        return self.masks[window]


class CompiledDecoder:
    """`model(token, cache)`'s last logits (1, vocab) for one new token, compiled.

    The model holds its decoder (`decoder`), and the decoder only a weak reference to the
    model: no cycle, so a model no longer used frees its weights at once (the traces keep the
    weights as constants until the compiled function is gone)."""

    def __init__(self, model: Model):
        for m in model.modules():  # arrays a layer makes on first use must exist before the trace
            if isinstance(m, RoPE):
                m.frequencies()
        owner = weakref.ref(model)

        def trace(token: mx.array, position: mx.array, *state: mx.array) -> tuple[mx.array, ...]:
            masks: dict = {}
            slots = [Slot(kv, position, masks) for kv in state]
            with layers.deferring():  # the "tail" piece: its launches ordered by the steps' chain
                logits = owner()(token, slots)[:, -1, :]
            # the next position, computed after this step's logits (its value: position + 1): the
            # next step's attention reads it, so it runs after this step's kernels even where its
            # token was not computed from these logits (tokens given, several steps in one graph)
            after = position + 1 + mx.isnan(logits[0, 0]).astype(mx.int32) * 0
            return (logits, after, *[s.kv for s in slots])

        self.step = mx.compile(trace)
        self.last: mx.array | None = None  # the last step's logits
        self.next: tuple | None = None  # (id of the caches, their offset, the position array) after the last step

    def __call__(self, y: mx.array, cache: list[KVCache]) -> mx.array:
        """y: the last token (1,) int32 → the next logits (1, vocab); the cache advances by one."""
        chained = self.next is not None and self.next[:2] == (id(cache), cache[0].offset)
        grows = any(c.offset + 1 > c.kv.shape[2] for c in cache)
        if self.last is not None and (grows or not chained):
            # the steps so far go to the GPU first: MLX orders a CUDA graph's kernels by the buffers
            # they declare (mx.depends adds no such edge), and graphs in the order they are
            # submitted. Growing copies the buffer: after the last step's kernels, which may have
            # written its last row behind MLX's back (the "inplace" attention); a step for another
            # cache (or an offset moved) does not read the chained position, which orders the
            # steps (a layer's "tail" launches share its counter)
            mx.async_eval(self.last)
        for c in cache:
            c.reserve(1)
        position = self.next[2] if chained else mx.array(cache[0].offset, mx.int32)
        out = self.step(y[None], position, *[c.kv for c in cache])
        for c, kv in zip(cache, out[2:]):  # the only references to the new buffers: the next step updates them in place
            c.kv = kv
            c.offset += 1
        self.last, self.next = out[0], (id(cache), cache[0].offset, out[1])
        return out[0]


def decoder(model, cache, compiled: bool | None = None):
    """The decode-step function for `model` with `cache`: compiled where `enabled` (or as
    `compiled` says), else the model called op by op."""
    if compiled if compiled is not None else enabled(model, cache):
        step = getattr(model, "_compiled_decoder", None)
        if step is None:
            step = model._compiled_decoder = CompiledDecoder(model)
        return lambda y: step(y, cache)
    return lambda y: model(y[None], cache)[:, -1, :]
