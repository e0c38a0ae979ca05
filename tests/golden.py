"""Helpers to load the llama.cpp golden files in ``tests/golden/`` and compare to them.

The files are produced by ``scripts/make_goldens.py`` (see its docstring for the
exact procedure).  Only numpy and the standard library are used here, so the
module can be imported from tests and from the generator script.

Teacher-forced logits (``smollm2_botchan512.npz``)::

    g = load_teacher_forced()               # TeacherForcedGolden
    ours = model_logits(g.tokens)           # (T, V) array, T <= len(g.tokens)
    r = compare_logits(g, ours)
    assert r["top1_agreement"] >= 0.99 and r["mean_kl"] < 1e-2

Greedy generations (``smollm2_greedy.json``)::

    gg = load_greedy()                      # GreedyGolden
    for e in gg.entries:
        out = our_greedy(e["prompt_ids"], max_new_tokens=len(e["generated"]),
                         stop_at=gg.meta["eog_token_ids"])
        res = check_greedy(e, out)
        assert res.ok, str(res)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
BOTCHAN512_PATH = os.path.join(GOLDEN_DIR, "smollm2_botchan512.npz")
GREEDY_PATH = os.path.join(GOLDEN_DIR, "smollm2_greedy.json")

#: Default tolerance of :func:`check_greedy`: a divergence is accepted only at a
#: step where llama.cpp's top1 - top2 logit gap is below this.
GAP_TOL = 0.5

_CHUNK = 64  # rows processed at once (keeps float64 temporaries ~25 MB for V=49152)


# ----------------------------------------------------------------------- teacher-forced
@dataclass
class TeacherForcedGolden:
    """llama.cpp's teacher-forced logits, reduced to top-k + tail statistics.

    Row ``t`` holds the logits predicting token ``t + 1`` after ``tokens[:t + 1]``.
    """

    tokens: np.ndarray          # int32 (T,)   input token ids (BOS included iff metadata says so)
    topk_ids: np.ndarray        # int32 (T, K) ids of the K largest logits, descending
    topk_logits: np.ndarray     # float32 (T, K) their logits
    logsumexp: np.ndarray       # float32 (T,) logsumexp of the full row
    tail_logsumexp: np.ndarray  # float32 (T,) logsumexp of the row without the top-K ids
    argmax: np.ndarray          # int32 (T,)  == topk_ids[:, 0]
    meta: dict = field(default_factory=dict)  # llama_cpp_version, model_sha256, text, ...

    @property
    def top2_gap(self) -> np.ndarray:
        """llama.cpp's top1 - top2 logit gap per row (float32, (T,))."""
        return self.topk_logits[:, 0] - self.topk_logits[:, 1]


def load_teacher_forced(path: str = BOTCHAN512_PATH) -> TeacherForcedGolden:
    """Load ``smollm2_botchan512.npz`` (or another file of the same layout)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}
        return TeacherForcedGolden(
            tokens=z["tokens"], topk_ids=z["topk_ids"], topk_logits=z["topk_logits"],
            logsumexp=z["logsumexp"], tail_logsumexp=z["tail_logsumexp"],
            argmax=z["argmax"], meta=meta)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _as_logits(golden: TeacherForcedGolden, logits: Any) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 3 and x.shape[0] == 1:  # (1, T, V) batch of one
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected (T, V) logits, got shape {x.shape}")
    T = len(golden.tokens)
    if x.shape[0] > T:
        raise ValueError(f"{x.shape[0]} rows of logits, golden has only {T}")
    if x.shape[1] <= int(golden.topk_ids.max()):
        raise ValueError(f"vocab of {x.shape[1]} is too small for the golden ids")
    return x


def top1_agreement(golden: TeacherForcedGolden, logits: Any) -> float:
    """Fraction of rows where argmax(ours) == llama.cpp's argmax.

    ``logits``: our full logits (T', V) for ``golden.tokens[:T']`` (T' <= T), any
    array-like (numpy, mlx, ...).  Ties in ours resolve to the lowest id.
    """
    x = _as_logits(golden, logits)
    return float(np.mean(np.argmax(x, axis=1) == golden.argmax[: x.shape[0]]))


def kl_estimate(golden: TeacherForcedGolden, logits: Any) -> np.ndarray:
    """Per-row coarse-grained KL(llama.cpp || ours) in nats, float64 (T',).

    Both distributions (softmax of the full rows) are coarse-grained onto K + 1
    buckets: the K = 64 token ids llama.cpp ranked highest (stored in the golden
    file) and one 'rest' bucket holding the remaining probability mass.  llama.cpp's
    bucket probabilities come from the stored top-K logits, full-row logsumexp and
    tail logsumexp; ours from our full row.  Then
    ``KL = sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)``.

    This is a LOWER BOUND of the true KL (data-processing / log-sum inequality:
    merging outcomes can only lose information), tight when the tail mass is small
    or when ours and llama.cpp's tail distributions are proportional.  Measured when
    the golden file was generated (see ``meta['kl_estimator_check']`` and
    ``meta['noise_floor']``): for near-matching logits the estimate is about
    80-95% of the exact KL (e.g. 2.4e-3 vs 2.9e-3), since perturbations spread
    over the ~49k tail tokens are invisible to it.  Tiny negative values from
    float rounding are clipped to 0.

    ``logits``: our full logits (T', V) for ``golden.tokens[:T']`` (T' <= T).
    """
    x = _as_logits(golden, logits)
    n = x.shape[0]
    out = np.empty(n, np.float64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        q = x[s:e].astype(np.float64)
        ids = golden.topk_ids[s:e].astype(np.int64)
        top_p = golden.topk_logits[s:e].astype(np.float64)
        tail_p = golden.tail_logsumexp[s:e].astype(np.float64)
        # Normalise the K + 1 buckets exactly in float64 (rather than with the stored
        # float32 full-row logsumexp, whose rounding would bias the KL by ~1e-7).
        lse_p = np.logaddexp(_logsumexp(top_p, axis=1), tail_p)[:, None]
        logp = top_p - lse_p
        logp_rest = tail_p - lse_p[:, 0]
        lse_q = _logsumexp(q, axis=1)
        logq = np.take_along_axis(q, ids, axis=1) - lse_q[:, None]
        np.put_along_axis(q, ids, -np.inf, axis=1)
        logq_rest = _logsumexp(q, axis=1) - lse_q
        p = np.exp(logp)
        p_rest = np.exp(logp_rest)
        with np.errstate(invalid="ignore", divide="ignore"):
            kl = np.sum(p * (logp - logq), axis=1)
            kl_rest = np.where(p_rest > 0, p_rest * (logp_rest - logq_rest), 0.0)
        out[s:e] = np.maximum(kl + kl_rest, 0.0)
    return out


def exact_kl(p_logits: Any, q_logits: Any) -> np.ndarray:
    """Exact per-row KL(softmax(p) || softmax(q)) in nats from two full (T, V) arrays."""
    p_all, q_all = np.asarray(p_logits), np.asarray(q_logits)
    if p_all.shape != q_all.shape:
        raise ValueError(f"shape mismatch {p_all.shape} vs {q_all.shape}")
    out = np.empty(p_all.shape[0], np.float64)
    for s in range(0, p_all.shape[0], _CHUNK):
        p = p_all[s:s + _CHUNK].astype(np.float64)
        q = q_all[s:s + _CHUNK].astype(np.float64)
        logp = p - _logsumexp(p, axis=1)[:, None]
        logq = q - _logsumexp(q, axis=1)[:, None]
        out[s:s + _CHUNK] = np.maximum(np.sum(np.exp(logp) * (logp - logq), axis=1), 0.0)
    return out


def compare_logits(golden: TeacherForcedGolden, logits: Any) -> dict:
    """Compare our full logits (T', V), T' <= T, against llama.cpp's golden rows.

    Returns a dict:
      ``n``               rows compared (T')
      ``top1_agreement``  fraction of rows with the same argmax (float)
      ``mean_kl``         mean of :func:`kl_estimate` (nats; a lower bound of the true KL)
      ``max_kl``          max of :func:`kl_estimate`
      ``kl``              per-row estimates (float64 (T',))
      ``disagreements``   list of (row, llama_cpp_id, our_id, llama_cpp_top2_gap)
    """
    x = _as_logits(golden, logits)
    n = x.shape[0]
    ours = np.argmax(x, axis=1)
    ref = golden.argmax[:n]
    kl = kl_estimate(golden, x)
    gap = golden.top2_gap[:n]
    bad = np.nonzero(ours != ref)[0]
    return dict(
        n=n,
        top1_agreement=float(np.mean(ours == ref)),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        kl=kl,
        disagreements=[(int(t), int(ref[t]), int(ours[t]), float(gap[t])) for t in bad],
    )


# ------------------------------------------------------------------------------ greedy
@dataclass
class GreedyGolden:
    """``smollm2_greedy.json``: ``meta`` (llama_cpp_version, model_sha256,
    eog_token_ids, max_new_tokens, ...) and ``entries``, each a dict with
    ``name, kind ('raw'|'chatml'), prompt, special, add_bos, prompt_ids,
    generated, gaps, top2, stop_reason ('length'|'eog'), text``.

    ``generated[k]`` is llama.cpp's greedy token at step k, ``gaps[k]`` its
    top1 - top2 logit gap at that step and ``top2[k]`` the runner-up id.  A
    generation stops after ``max_new_tokens`` tokens or right after (and
    including) an end-of-generation token.
    """

    meta: dict
    entries: list

    def by_name(self, name: str) -> dict:
        for e in self.entries:
            if e["name"] == name:
                return e
        raise KeyError(name)


def load_greedy(path: str = GREEDY_PATH) -> GreedyGolden:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    for e in obj["entries"]:
        assert len(e["generated"]) == len(e["gaps"]) == len(e["top2"]), e["name"]
    return GreedyGolden(meta=obj["meta"], entries=obj["entries"])


@dataclass
class GreedyCheck:
    """Result of :func:`check_greedy`.

    ``ok``: identical, or the first divergence is at a step whose llama.cpp top-2
    gap is < tol.  ``identical``: no divergence in the compared steps.
    ``step``/``gap``/``expected``/``got``: the first divergence (step index into
    the generated tokens, llama.cpp's gap there, llama.cpp's token, ours; ``got``
    is None if ours ended early), all None when identical.
    """

    ok: bool
    identical: bool
    n_compared: int
    step: int | None = None
    gap: float | None = None
    expected: int | None = None
    got: int | None = None
    tol: float = GAP_TOL
    name: str = ""

    def __str__(self) -> str:
        if self.identical:
            return f"{self.name}: identical over {self.n_compared} steps"
        verdict = "tolerated" if self.ok else "FAIL"
        return (f"{self.name}: first divergence at step {self.step}: llama.cpp {self.expected}, "
                f"ours {self.got}, llama.cpp top-2 gap {self.gap:.4f} "
                f"({verdict}; tol {self.tol})")


def check_greedy(entry: dict, generated: Sequence[int], tol: float = GAP_TOL,
                 max_steps: int | None = None) -> GreedyCheck:
    """Check our greedy tokens against a golden entry (from ``load_greedy().entries``).

    ``generated``: our generated token ids only (not the prompt), produced from
    ``entry['prompt_ids']``; any array-like of ints.  The first
    ``min(max_steps, len(entry['generated']))`` golden steps are compared (all
    by default); extra tokens of ours beyond that are ignored.  Rule: pass if
    identical, or if the first divergence happens at a step where llama.cpp's
    top1 - top2 logit gap is < ``tol`` (after a divergence the continuations are
    not comparable, so nothing later is checked).  If ours is shorter than the
    compared range, that counts as a divergence at step ``len(generated)`` with
    ``got=None``.
    """
    ref = [int(t) for t in entry["generated"]]
    gaps = entry["gaps"]
    n = len(ref) if max_steps is None else min(int(max_steps), len(ref))
    ours = [int(t) for t in np.asarray(generated).reshape(-1)]
    name = entry.get("name", "")
    for k in range(n):
        got = ours[k] if k < len(ours) else None
        if got != ref[k]:
            g = float(gaps[k])
            return GreedyCheck(ok=(got is not None and g < tol), identical=False,
                               n_compared=k + 1, step=k, gap=g, expected=ref[k], got=got,
                               tol=tol, name=name)
    return GreedyCheck(ok=True, identical=True, n_compared=n, tol=tol, name=name)
