"""Each sampler step against probabilities computed by hand, and seeded reproducibility."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.sample import (
    SamplingParams,
    apply_min_p,
    apply_repeat_penalty,
    apply_top_k,
    apply_top_p,
    make_sampler,
    process_logits,
)

LOG = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]  # logits whose softmax is 0.5, 0.3, 0.15, 0.05


def probs(logits) -> list[float]:
    return np.array(mx.softmax(logits, axis=-1)).tolist()[0]


def test_top_k_keeps_the_k_largest():
    assert probs(apply_top_k(mx.array([LOG]), 2)) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert probs(apply_top_k(mx.array([LOG]), 0)) == pytest.approx([0.5, 0.3, 0.15, 0.05])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7, 0.5 + 0.3 ≥ 0.7: the first two stay
    assert probs(apply_top_p(mx.array([LOG]), 0.7)) == pytest.approx([0.625, 0.375, 0, 0])
    # exactly 0.8 reached by two tokens: still two
    assert probs(apply_top_p(mx.array([LOG]), 0.8)) == pytest.approx([0.625, 0.375, 0, 0])
    assert probs(apply_top_p(mx.array([LOG]), 0.81)) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # order of the vocabulary does not matter
    assert probs(apply_top_p(mx.array([LOG[::-1]]), 0.7)) == pytest.approx([0, 0, 0.375, 0.625])


def test_min_p_drops_tokens_below_p_times_the_top():
    # threshold 0.25 * 0.5 = 0.125: 0.05 goes
    assert probs(apply_min_p(mx.array([LOG]), 0.25)) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_repeat_penalty(mx.array([[2.0, -2.0, 1.0, 0.5]]), mx.array([0, 1, 1]), 2.0)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_chain_order_and_temperature():
    """penalty → top-k → top-p → min-p → temperature, as llama.cpp chains them."""
    logits = mx.array([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]])
    # penalty 2 on token 0: log(0.4) < 0 so it is multiplied: p0 ∝ 0.4**2 = 0.16
    p = SamplingParams(temp=0.5, top_k=3, top_p=1.0, min_p=0.0, repeat_penalty=2.0)
    out = probs(process_logits(logits, mx.array([0]), p))
    kept = np.array([0.3, 0.2, 0.16])  # top-3 after the penalty: tokens 1, 2, 0
    tempered = kept ** (1 / 0.5) / (kept ** (1 / 0.5)).sum()
    assert out == pytest.approx([tempered[2], tempered[0], tempered[1], 0])


def test_samples_follow_the_distribution():
    p = SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    sample = make_sampler(p)
    logits = mx.array([LOG])
    counts = np.bincount([sample(logits, None).item() for _ in range(4000)], minlength=4) / 4000
    assert counts == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)


def test_greedy_and_seeds():
    logits = mx.array([[0.1, 3.0, 2.9, -1.0]])
    assert make_sampler(SamplingParams(temp=0))(logits, None).item() == 1

    def draws(seed):
        sample = make_sampler(SamplingParams(temp=1.5, top_k=0, seed=seed))
        return [sample(logits, None).item() for _ in range(30)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)
