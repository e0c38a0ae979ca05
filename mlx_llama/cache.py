"""A per-layer key/value cache, preallocated in steps and written in place.

Keys and values share one buffer, (B, 2 · kv_heads, capacity, head_dim): the keys' heads, then
the values'. The compiled decode step then writes a token's key and value with one scatter (one kernel per
layer and token where two were); `keys`/`values` are views of the two halves.
"""

from __future__ import annotations

import mlx.core as mx


def halves(kv: mx.array) -> tuple[mx.array, mx.array]:
    """A (B, 2 · kv_heads, …) buffer's keys and values, views."""
    H = kv.shape[1] // 2
    return kv[:, :H], kv[:, H:]


class KVCache:
    step = 256  # tokens added per reallocation

    def __init__(self):
        self.kv: mx.array | None = None  # (B, 2 · kv_heads, capacity, head_dim)
        self.offset = 0  # tokens held

    @property
    def keys(self) -> mx.array | None:
        """(B, kv_heads, capacity, head_dim), a view."""
        return None if self.kv is None else halves(self.kv)[0]

    @property
    def values(self) -> mx.array | None:
        return None if self.kv is None else halves(self.kv)[1]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, kv_heads, T, head_dim) keys/values; return everything held so far."""
        start, T = self.offset, keys.shape[2]
        if self.kv is None:
            B, H, _, D = keys.shape
            self.kv = mx.zeros((B, 2 * H, 0, D), keys.dtype)
        self.reserve(T)
        self.offset += T
        H = self.kv.shape[1] // 2
        self.kv[:, :H, start : self.offset, :] = keys  # two writes: no copy to join them first
        self.kv[:, H:, start : self.offset, :] = values
        return halves(self.kv[..., : self.offset, :])

    def reserve(self, T: int) -> None:
        """Room for T more tokens (the buffer exists: after the first update)."""
        start = self.offset
        if start + T > self.kv.shape[2]:
            B, H2, _, D = self.kv.shape
            grow = -(-(start + T) // self.step) * self.step - start  # capacity: a multiple of the step
            self.kv = mx.concatenate([self.kv[..., :start, :], mx.zeros((B, H2, grow, D), self.kv.dtype)], axis=2)

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (the next write overwrites them)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> tuple[mx.array]:
        return (self.kv,)
