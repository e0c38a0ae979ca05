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
        if self.keys is None or start + T > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = ((T + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, D), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_v], axis=2)
        self.offset += T
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (the next write overwrites them)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self):
        return self.keys, self.values
