"""Attention and SwiGLU for MLX's CPU backend.

MLX's CPU backend evaluates `exp` (and so `sigmoid`, `silu`, `softmax`) one scalar at a time:
~85 M/s on the 2-core test machine, about 100× slower per element than a multiply. In a
prompt pass that made SiLU and the attention softmax cost more than all the matmuls together.
Here `exp` is built from multiplies and adds (2^x = 2^n · 2^f, a degree-6 polynomial for 2^f,
relative error ~2e-7, float32 rounding level) and fused with `mx.compile`, which
vectorizes on the CPU: ~5× faster. On a GPU the model uses MLX's own kernels instead.
"""

from __future__ import annotations

import mlx.core as mx

LOG2E = 1.4426950408889634
# Least-squares fit of 2^f on [0, 1), lowest power first.
EXP2_COEFFS = (
    1.0000000061582048,
    0.693146837700718,
    0.2402310967616626,
    0.05547891246253931,
    0.009686186290821555,
    0.001238241553487795,
    0.00021871262330584046,
)


def exp(x: mx.array) -> mx.array:
    """e^x for float32 x, from multiplies and adds; underflows to 2^-126 instead of 0."""
    y = mx.clip(x * LOG2E, -126.0, 126.0)
    n = mx.floor(y)
    f = y - n
    p = EXP2_COEFFS[-1]
    for c in EXP2_COEFFS[-2::-1]:  # Horner
        p = p * f + c
    two_n = mx.left_shift((n + 127).astype(mx.int32), 23).view(mx.float32)  # the float with exponent n
    return p * two_n


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    return gate / (1.0 + exp(-gate)) * up


GELU_K = 0.7978845608028654  # √(2/π)


@mx.compile
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_tanh(gate) * up; 0.5·(1 + tanh(z)) = sigmoid(2z), so gelu_tanh(x) = x / (1 + e^(−2z))."""
    z = GELU_K * (gate + 0.044715 * gate * gate * gate)
    return gate / (1.0 + exp(-2.0 * z)) * up


@mx.compile
def _masked_softmax(scores: mx.array, mask: mx.array) -> mx.array:
    m = mx.max(scores, axis=-1, keepdims=True)
    e = mx.where(mask, exp(scores - m), 0.0)
    return e / mx.sum(e, axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, window: int = 0) -> mx.array:
    """Causal grouped-query attention; the T queries are the last T of the S key positions.

    q: (B, H, T, D); k, v: (B, KV, S, D) → (B, H, T, D). Query head h reads kv head h // (H/KV).
    window: a query sees only the last `window` positions, itself included (0: all before it).
    """
    B, H, T, D = q.shape
    if T == 1:  # one new token sees every cached key: a few thousand exps, MLX's kernel is fine
        if window:
            k, v = k[..., -window:, :], v[..., -window:, :]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    KV, S = k.shape[1], k.shape[2]
    # (B, H, T, D) → (B, KV, H/KV * T, D): each kv head's query heads as one matmul (BLAS)
    scores = (q.reshape(B, KV, -1, D) * scale) @ k.swapaxes(-1, -2)
    visible = causal_mask(T, S, window)
    probs = _masked_softmax(scores.reshape(B, KV, -1, T, S), visible).reshape(B, KV, -1, S)
    return (probs @ v).reshape(B, H, T, D)


def causal_mask(T: int, S: int, window: int = 0) -> mx.array:
    """(T, S) bool: query t (at position S − T + t) sees key s; within `window` positions if set."""
    keys, queries = mx.arange(S)[None], mx.arange(S - T, S)[:, None]
    visible = keys <= queries
    return visible & (keys > queries - window) if window else visible
