#!/usr/bin/env python3
"""Benchmark mlx_llama's tokenizer against llama.cpp's on 1 MB of English text.

    python scripts/bench_tokenizer.py [--text botchan.txt|sentencepiece-*.tar.gz] [--mb 1]
                                      [--repeats 3] [--vocab NAME ...] [-m GGUF ...]

The text is sentencepiece's test/botchan.txt (found as scripts/make_goldens.py finds it: --text,
/tmp/dl, or the sdist downloaded with pip), repeated and cut to --mb megabytes (at a character
boundary). For each vocabulary, both tokenizers encode it as a prompt is encoded (BOS as the
file asks, special tokens parsed): mlx_llama `Tokenizer.encode(text, add_special=True,
parse_special=True)`, llama.cpp `Llama(vocab_only=True).tokenize(bytes, add_bos=True,
special=True)` (llama-cpp-python 0.3.36). Times are the best of --repeats wall-clock runs in
this process; mlx_llama's cache of already merged words is emptied before each run, so every run
starts cold. The ids must be identical. ratio = mlx_llama / llama.cpp (acceptance: ≤ 2).

Vocabularies: SmolLM2-135M-Instruct (the default model) and llama.cpp's vocab
test files in tests/.cache/vocab/ (scripts/fetch_vocab_tests.sh): llama-spm, llama-bpe, qwen2,
gpt-2 by default; --vocab picks others by name, -m adds any GGUF file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

DEFAULT_VOCABS = ["smollm2", "llama-spm", "llama-bpe", "qwen2", "gpt-2"]


def vocab_file(name: str) -> Path | None:
    if name == "smollm2":
        from mlx_llama import default_model

        path = Path(default_model())
    else:
        path = REPO / "tests" / ".cache" / "vocab" / f"ggml-vocab-{name}.gguf"
    return path if path.exists() else None


def english_text(path: str | None, n_bytes: int) -> str:
    from make_goldens import read_botchan

    raw, source = read_botchan(path)
    text = raw.decode("utf-8-sig")
    text = text * (n_bytes // len(text.encode()) + 1)
    data = text.encode()[:n_bytes]
    print(f"text: {source}, repeated and cut to {len(data):,} bytes", file=sys.stderr)
    return data.decode("utf-8", "ignore")


def best_of(repeats: int, fn, before=None) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if before:
            before()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench(name: str, path: Path, text: str, repeats: int) -> dict:
    import llama_cpp

    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.tokenizer import Tokenizer

    t = time.perf_counter()
    gguf_file = GGUFFile(path)
    t_meta = time.perf_counter() - t
    t = time.perf_counter()
    tok = Tokenizer.from_gguf(gguf_file)
    t_tok = time.perf_counter() - t
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    data = text.encode()

    def cold():  # forget the words merged by earlier runs
        cache = getattr(tok._engine, "_cache", None)
        if cache is not None:
            cache.clear()

    t_ref, ref = best_of(repeats, lambda: llm.tokenize(data, add_bos=True, special=True))
    t_ours, ours = best_of(repeats, lambda: tok.encode(text, add_special=True, parse_special=True), cold)
    return dict(name=name, kind=f"{tok.model}/{tok.pre or 'spm'}", tokens=len(ref), same=ours == ref,
                llama=t_ref, mlx=t_ours, load_meta=t_meta, load_tok=t_tok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", help="botchan.txt or the sentencepiece sdist (default: as make_goldens.py)")
    ap.add_argument("--mb", type=float, default=1.0, help="megabytes of text (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", nargs="*", default=None, help=f"names (default: {' '.join(DEFAULT_VOCABS)})")
    ap.add_argument("-m", "--model", nargs="*", default=[], help="more GGUF files")
    args = ap.parse_args()

    text = english_text(args.text, int(args.mb * 1_000_000))
    runs = [(n, vocab_file(n)) for n in (args.vocab if args.vocab is not None else DEFAULT_VOCABS)]
    runs += [(Path(m).stem, Path(m)) for m in args.model]
    rows = []
    for name, path in runs:
        if path is None:
            print(f"skipping {name}: file not found (scripts/fetch_vocab_tests.sh)", file=sys.stderr)
            continue
        rows.append(bench(name, path, text, args.repeats))

    print(f"\nencode {len(text.encode()):,} bytes of English, best of {args.repeats} "
          f"(CPU: {os.cpu_count()} cores, llama-cpp-python {__import__('llama_cpp').__version__})\n")
    print("| vocabulary | tokenizer | tokens | llama.cpp s | mlx_llama s | ratio | ids equal "
          "| load s (GGUFFile + Tokenizer) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['kind']} | {r['tokens']:,} | {r['llama']:.3f} | {r['mlx']:.3f} | "
              f"{r['mlx'] / r['llama']:.2f} | {'yes' if r['same'] else 'NO'} | "
              f"{r['load_meta']:.2f} + {r['load_tok']:.2f} |")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
