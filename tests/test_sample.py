"""The sampler chain: each step against probabilities computed by hand, the chain's order,
seeded reproducibility, one trace per sampler, and step by step against llama.cpp's own
samplers (through llama-cpp-python, when it is installed)."""

import ctypes
import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama.sample as sample_mod
from mlx_llama import MlxLlamaError
from mlx_llama.sample import SamplingParams, make_sampler, process_logits

INF = float("inf")
PROBS = [0.5, 0.3, 0.15, 0.05]
LOG = [math.log(p) for p in PROBS]  # logits whose softmax is 0.5, 0.3, 0.15, 0.05
# every step off: each test turns on the one it checks
OFF = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)


def dist(logits, history=None, **params) -> list[float]:
    """The distribution the token is drawn from, after the chain with `params` (the rest off)."""
    hist = None if history is None else mx.array(history, mx.int32)
    out = process_logits(mx.array([logits], mx.float32), hist, SamplingParams(**{**OFF, **params}))
    return np.array(mx.softmax(out, axis=-1)).tolist()[0]


def chain_logits(logits, history=None, **params) -> list[float]:
    hist = None if history is None else mx.array(history, mx.int32)
    return np.array(process_logits(mx.array([logits], mx.float32), hist, SamplingParams(**{**OFF, **params}))).tolist()[0]


def normalized(p):
    p = np.asarray(p, np.float64)
    return (p / p.sum()).tolist()


def test_defaults_are_llama_cpp_s():
    p = SamplingParams()
    assert (p.temp, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty) == (64, 1.0, 0.0, 0.0)
    assert p.logit_bias == {} and p.penalty_last_n == 0  # penalties off: no history needed
    assert SamplingParams(frequency_penalty=0.1).penalty_last_n == 64
    assert SamplingParams(presence_penalty=0.1, repeat_last_n=8).penalty_last_n == 8


# ---- each step by hand ------------------------------------------------------------------


def test_logit_bias_adds_to_the_logit_and_minus_inf_bans():
    out = chain_logits([1.0, 2.0, 3.0, 4.0], logit_bias={0: 0.5, 2: -1.0, 3: -INF})
    assert out == [1.5, 2.0, 2.0, -INF]
    assert dist(LOG, logit_bias={0: -INF}) == pytest.approx(normalized([0, 0.3, 0.15, 0.05]))
    # +log 2 on token 3 doubles its weight
    assert dist(LOG, logit_bias={3: math.log(2)}) == pytest.approx(normalized([0.5, 0.3, 0.15, 0.1]))


def test_logit_bias_outside_the_vocabulary_is_an_error():
    with pytest.raises(MlxLlamaError, match="outside the vocabulary"):
        chain_logits(LOG, logit_bias={4: 1.0})


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    # token 0 twice, token 1 and token 3 once; a token's logit is penalized once, however often it occurs
    out = chain_logits([2.0, -2.0, 1.0, 0.0], [0, 1, 0, 3], repeat_penalty=2.0)
    assert out == [1.0, -4.0, 1.0, 0.0]


def test_frequency_and_presence_penalties_count_occurrences():
    logits = [2.0, -2.0, 1.0, 0.5]
    # counts: token 0 ×3, token 1 ×1, token 2 ×0, token 3 ×2
    hist = [0, 3, 0, 1, 3, 0]
    out = chain_logits(logits, hist, frequency_penalty=0.25)
    assert out == pytest.approx([2.0 - 0.75, -2.0 - 0.25, 1.0, 0.5 - 0.5])
    out = chain_logits(logits, hist, presence_penalty=0.25)
    assert out == pytest.approx([1.75, -2.25, 1.0, 0.25])
    # all three: repeat first, then count × frequency + presence subtracted
    out = chain_logits(logits, hist, repeat_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5)
    assert out == pytest.approx([2.0 / 2 - (0.75 + 0.5), -2.0 * 2 - (0.25 + 0.5), 1.0, 0.5 / 2 - (0.5 + 0.5)])


def test_penalties_look_back_over_the_last_repeat_last_n_tokens():
    logits = [2.0, 2.0, 2.0, 2.0]
    hist = [0, 0, 1, 2, 2]  # the last 3: 1, 2, 2
    out = chain_logits(logits, hist, frequency_penalty=1.0, repeat_last_n=3)
    assert out == [2.0, 1.0, 0.0, 2.0]
    # a history shorter than the window counts as it is
    assert chain_logits(logits, [3], frequency_penalty=1.0, repeat_last_n=3) == [2.0, 2.0, 2.0, 1.0]
    # repeat_last_n 0: off
    assert chain_logits(logits, hist, frequency_penalty=1.0, repeat_last_n=0) == logits


def test_top_k_keeps_the_k_largest():
    assert dist(LOG, top_k=2) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert dist(LOG[::-1], top_k=3) == pytest.approx([0, 0.15 / 0.95, 0.3 / 0.95, 0.5 / 0.95])
    assert dist(LOG, top_k=0) == pytest.approx(PROBS)  # off
    assert dist(LOG, top_k=10) == pytest.approx(PROBS)  # more than the vocabulary: all


@pytest.mark.parametrize("vocab", [49152, 32000, 4099])
def test_top_k_on_a_large_vocabulary_is_exact(vocab):
    """top-k looks only at the k blocks with the largest maxima: still exactly the k largest."""
    rng = np.random.default_rng(vocab)
    logits = rng.permutation(vocab).astype(np.float32)  # distinct values
    logits[rng.choice(vocab, 300, replace=False)] = -INF
    for k in (1, 40, 100, 1000):
        out = np.array(process_logits(mx.array(logits[None]), None, SamplingParams(**{**OFF, "top_k": k})))[0]
        kept = np.flatnonzero(np.isfinite(out))
        assert set(kept) == set(np.argsort(-logits)[:k])
        assert np.array_equal(out[kept], logits[kept])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7, 0.5 + 0.3 ≥ 0.7: the first two stay
    assert dist(LOG, top_p=0.7) == pytest.approx([0.625, 0.375, 0, 0])
    assert dist(LOG, top_p=0.81) == pytest.approx(normalized([0.5, 0.3, 0.15, 0]))
    assert dist(LOG, top_p=0.5) == pytest.approx([1, 0, 0, 0])  # the first reaches p: it stays alone
    assert dist(LOG, top_p=0.0) == pytest.approx([1, 0, 0, 0])  # at least one token
    # the order of the vocabulary does not matter
    assert dist(LOG[::-1], top_p=0.7) == pytest.approx([0, 0, 0.375, 0.625])


def test_min_p_drops_tokens_below_p_times_the_top():
    # threshold 0.25 × 0.5 = 0.125: 0.05 goes
    assert dist(LOG, min_p=0.25) == pytest.approx(normalized([0.5, 0.3, 0.15, 0]))
    # 0.35 × 0.5 = 0.175: 0.15 goes too
    assert dist(LOG, min_p=0.35) == pytest.approx([0.625, 0.375, 0, 0])


def test_temperature_divides_the_logits():
    expected = normalized(np.array(PROBS) ** (1 / 0.5))
    assert dist(LOG, temp=0.5) == pytest.approx(expected)
    assert chain_logits([1.0, -3.0], temp=2.0) == [0.5, -1.5]


def test_greedy_is_the_top_token_after_bias_and_penalties():
    # temperature 0: one token left; llama.cpp still applies bias and penalties first
    assert dist(LOG, temp=0) == [1, 0, 0, 0]
    assert dist(LOG, temp=0, logit_bias={0: -INF}) == [0, 1, 0, 0]
    # token 0 seen: log(0.5) × 3 < log(0.3)
    assert dist(LOG, [0], temp=0, repeat_penalty=3.0) == [0, 1, 0, 0]
    logits = mx.array([[0.1, 3.0, 2.9, -1.0]])
    assert make_sampler(SamplingParams(temp=0))(logits, None).item() == 1
    assert make_sampler(SamplingParams(temp=0, presence_penalty=0.2))(logits, mx.array([1], mx.int32)).item() == 2
    assert make_sampler(SamplingParams(temp=0, logit_bias={3: 5.0}))(logits, None).item() == 3


# ---- the chain's order ----------------------------------------------------------------


def test_chain_order_bias_penalties_top_k_top_p_min_p_temperature():
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.06, 0.04)]
    # bias before the penalties: token 4 gets +log 5 (weight 0.04 → 0.2); penalties see the biased logit.
    # penalty 2 on tokens 0 and 4: log(0.4) and log(0.2) < 0, so multiplied → weights 0.16, 0.04
    # weights now 0.16, 0.3, 0.2, 0.06, 0.04 → top-3: tokens 1, 2, 0 (renormalized: .3/.66, .2/.66, .16/.66)
    # top-p 0.7 on them: .4545 < .7, .4545 + .3030 ≥ .7 → tokens 1, 2 (min-p 0.5: .2 ≥ .5 × .3 keeps both)
    # temperature 0.5 last: weights squared .09, .04
    out = dist(logits, [0, 4], logit_bias={4: math.log(5)}, repeat_penalty=2.0, top_k=3, top_p=0.7, min_p=0.5, temp=0.5)
    assert out == pytest.approx([0, 0.09 / 0.13, 0.04 / 0.13, 0, 0])


def test_filters_use_the_probabilities_before_the_temperature():
    # min-p 0.4: 0.15 < 0.4 × 0.5 goes. At temperature 3 the flattened 0.15 would pass (if it came first).
    out = dist(LOG, min_p=0.4, temp=3.0)
    kept = np.array([0.5, 0.3]) ** (1 / 3)
    assert out == pytest.approx(normalized([*kept, 0, 0]))
    # top-p 0.7 keeps two tokens, whatever the temperature
    assert sum(x > 0 for x in dist(LOG, top_p=0.7, temp=5.0)) == 2


def test_top_k_comes_before_top_p():
    # top-k 2 first: renormalized .625/.375, so top-p 0.6 keeps one; the other way round it would keep two
    assert dist(LOG, top_k=2, top_p=0.6) == pytest.approx([1, 0, 0, 0])


# ---- drawing -----------------------------------------------------------------------------


def test_samples_follow_the_distribution():
    sample = make_sampler(SamplingParams(**OFF, seed=3))
    logits = mx.array([LOG])
    counts = np.bincount([sample(logits, None).item() for _ in range(4000)], minlength=4) / 4000
    assert counts == pytest.approx(PROBS, abs=0.03)


def test_samples_stay_in_the_filtered_set():
    sample = make_sampler(SamplingParams(temp=2.0, top_k=3, top_p=0.85, min_p=0.0, seed=5, logit_bias={1: -INF}))
    logits = mx.array([LOG + [math.log(0.001)] * 20])
    # bias bans 1; top-3: 0, 2, 3 (.5, .15, .05 → .7143, .2143, .0714); top-p .85: 0 and 2
    assert {sample(logits, None).item() for _ in range(300)} == {0, 2}


def test_same_seed_same_tokens():
    rng = np.random.default_rng(0)
    logits = [mx.array(rng.normal(size=(1, 49152)).astype(np.float32)) for _ in range(20)]

    def draws(seed, **kw):
        sample = make_sampler(SamplingParams(temp=1.5, top_k=100, top_p=0.99, seed=seed, **kw))
        hist = mx.array([5, 6, 7], mx.int32)
        out = []
        for x in logits:
            y = sample(x, hist)
            hist = mx.concatenate([hist, y])[-64:]
            out.append(y.item())
        return out

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)
    assert draws(11, repeat_penalty=1.2, frequency_penalty=0.5) == draws(11, repeat_penalty=1.2, frequency_penalty=0.5)


def test_no_seed_follows_mlx_s_global_generator():
    logits = mx.array([[0.0] * 1000])

    def draws():
        sample = make_sampler(SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0))
        return [sample(logits, None).item() for _ in range(10)]

    mx.random.seed(4)
    a = draws()
    mx.random.seed(4)
    assert draws() == a


def test_the_chain_is_traced_once(monkeypatch):
    """The compiled chain is traced once per sampler, while the history fills up too."""
    traces = []
    real = sample_mod.top_p

    def counting(*args):
        traces.append(1)
        return real(*args)

    monkeypatch.setattr(sample_mod, "top_p", counting)
    params = SamplingParams(seed=1, repeat_penalty=1.1, frequency_penalty=0.1, repeat_last_n=16, logit_bias={3: -INF})
    sample = make_sampler(params)
    x = mx.random.normal((1, 4096))
    hist = mx.array([1, 2], mx.int32)
    for _ in range(30):
        y = sample(x, hist)
        hist = mx.concatenate([hist, y])[-16:]
        mx.eval(y)
    assert len(traces) == 1


def test_bad_parameters():
    with pytest.raises(MlxLlamaError, match="repeat_last_n"):
        make_sampler(SamplingParams(repeat_last_n=-1))
    with pytest.raises(MlxLlamaError, match="repeat_penalty"):
        make_sampler(SamplingParams(repeat_penalty=0.0))


# ---- against llama.cpp's samplers ---------------------------------------------------------

STAGES = ("logit_bias", "penalties", "top_k", "top_p", "min_p", "temp")


def llama_cpp_chain(logits: np.ndarray, params: SamplingParams, history, stages) -> np.ndarray:
    """llama.cpp's samplers `stages` (in the chain's order) on `logits`, after accepting the
    history tokens; returns logits over the vocabulary with removed candidates at -inf."""
    L = pytest.importorskip("llama_cpp")
    vocab = len(logits)
    token_data = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    assert token_data.itemsize == ctypes.sizeof(L.llama_token_data)
    buf = np.zeros(vocab, token_data)
    buf["id"] = np.arange(vocab)
    buf["logit"] = logits
    cur = L.llama_token_data_array(buf.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), vocab, -1, False)
    bias = (L.llama_logit_bias * max(len(params.logit_bias), 1))(
        *[L.llama_logit_bias(t, b) for t, b in params.logit_bias.items()]
    )
    make = {
        "logit_bias": lambda: L.llama_sampler_init_logit_bias(vocab, len(params.logit_bias), bias),
        "penalties": lambda: L.llama_sampler_init_penalties(
            vocab, params.repeat_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
        ),
        "top_k": lambda: L.llama_sampler_init_top_k(params.top_k),
        "top_p": lambda: L.llama_sampler_init_top_p(params.top_p, 0),  # min_keep 0: common.h's default
        "min_p": lambda: L.llama_sampler_init_min_p(params.min_p, 0),
        "temp": lambda: L.llama_sampler_init_temp_ext(params.temp, 0.0, 1.0),  # as common/sampling.cpp adds it
    }
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        for name in stages:
            L.llama_sampler_chain_add(chain, make[name]())
        for t in history:
            L.llama_sampler_accept(chain, int(t))
        L.llama_sampler_apply(chain, ctypes.byref(cur))
    finally:
        L.llama_sampler_free(chain)
    out = np.full(vocab, -np.inf, np.float32)
    kept = buf[: cur.size]
    out[kept["id"]] = kept["logit"]
    return out


def ours_with(logits, params, history, stages):
    """Our chain with only `stages` on (the others at their off values)."""
    off = dict(logit_bias={}, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, top_k=0, top_p=1.0, min_p=0.0, temp=1.0)
    on = {"logit_bias": ["logit_bias"], "penalties": ["repeat_penalty", "frequency_penalty", "presence_penalty"],
          "top_k": ["top_k"], "top_p": ["top_p"], "min_p": ["min_p"], "temp": ["temp"]}
    fields = {**off, **{f: getattr(params, f) for s in stages for f in on[s]}}
    p = SamplingParams(**{**params.__dict__, **fields})
    hist = mx.array(np.asarray(history, np.int32))
    return np.array(process_logits(mx.array(logits[None]), hist, p))[0]


def softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def compare(ref, ours):
    kept = np.isfinite(ref)
    assert np.array_equal(kept, np.isfinite(ours)), f"kept {kept.sum()} vs {np.isfinite(ours).sum()} tokens"
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(softmax64(ours), softmax64(ref), rtol=0, atol=1e-5)
    return int(kept.sum())


CASES = [
    # vocab, logits scale, params
    (49152, 2.0, dict(temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.4)),
    (49152, 1.0, dict(temp=1.3, top_k=0, top_p=0.9, min_p=0.02, repeat_penalty=0.8, frequency_penalty=-0.1, presence_penalty=0.7)),
    (32000, 3.0, dict(temp=0.5, top_k=500, top_p=0.7, min_p=0.1, repeat_penalty=1.1, repeat_last_n=16)),
    (32003, 1.5, dict(temp=1.0, top_k=100, top_p=0.99, min_p=0.0, frequency_penalty=1.0, repeat_last_n=200)),
    (1000, 1.0, dict(temp=2.0, top_k=2000, top_p=0.5, min_p=0.3, presence_penalty=2.0)),
    (1000, 4.0, dict(temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.5)),
]


@pytest.mark.parametrize("vocab,scale,kw", CASES)
def test_matches_llama_cpp_step_by_step(vocab, scale, kw):
    """Each step alone, and each prefix of the chain, against llama.cpp's samplers on the same
    logits: the same surviving tokens, logits and probabilities (1e-5)."""
    pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(vocab + int(10 * scale))
    logits = (rng.normal(size=vocab) * scale).astype(np.float32)
    top = np.argsort(-logits)
    # history: repeats among the most likely tokens (so the penalties move the filters), and others
    history = np.concatenate([rng.choice(top[:30], 40), rng.integers(0, vocab, 40), top[:5], top[:2]])
    # bias: ban the top token, lift the least likely one among the best, nudge others
    lift = float(logits[top[2]] - logits[top[-1]])
    bias = {int(top[0]): -INF, int(top[-1]): lift, int(top[3]): 0.3, int(top[50]): 1.0, 17: -2.0}
    params = SamplingParams(**kw, logit_bias=bias)
    for stage in STAGES:
        compare(llama_cpp_chain(logits, params, history, [stage]), ours_with(logits, params, history, [stage]))
    for n in range(2, len(STAGES) + 1):
        survivors = compare(llama_cpp_chain(logits, params, history, STAGES[:n]), ours_with(logits, params, history, STAGES[:n]))
    # the whole chain: temperature 0 keeps only the top logit; otherwise a choice is left
    assert survivors == 1 if params.temp <= 0 else survivors > 1
