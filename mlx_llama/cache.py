"""A per-layer key/value cache, preallocated in steps and written in place."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256  # tokens added per reallocation

    def __init__(self):
        self.keys: mx.array | None = None  # (B, kv_heads, capacity, head_dim)
        self.values: mx.array | None = None
        self.offset = 0  # tokens held

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, kv_heads, T, head_dim) keys/values; return everything held so far."""
        start, T = self.offset, keys.shape[2]
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, 0, D), keys.dtype)
            self.values = mx.zeros((B, H, 0, D), values.dtype)
        self.reserve(T)
        self.offset += T
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reserve(self, T: int) -> None:
        """Room for T more tokens (the buffers exist: after the first update)."""
        start = self.offset
        if start + T > self.keys.shape[2]:
            B, H, _, D = self.keys.shape
            grow = -(-(start + T) // self.step) * self.step - start  # capacity: a multiple of the step
            self.keys = mx.concatenate([self.keys[..., :start, :], mx.zeros((B, H, grow, D), self.keys.dtype)], axis=2)
            self.values = mx.concatenate([self.values[..., :start, :], mx.zeros((B, H, grow, D), self.values.dtype)], axis=2)

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (the next write overwrites them)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self):
        return self.keys, self.values
