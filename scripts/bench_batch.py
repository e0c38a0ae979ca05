"""One decode step of `batch.Batch`'s model call against the single-sequence step, no server.

    python scripts/bench_batch.py [-m MODEL] [--rows 4] [--rounds 5]

Times the forward pass of one token (the sampled logits evaluated) for: the plain single
sequence (`generate`'s step), a batch of `--rows` rows with one live sequence (the rest padding,
as a lone client of a `--parallel ROWS` server runs), and with every row live. Rounds are
interleaved and the best of each kept, so that a busy machine slows all cases alike; the
tokens/s are printed as ratios against the plain step.
"""

from __future__ import annotations

import argparse
import time

import mlx_llama  # before mlx.core: it preloads OpenBLAS
import mlx.core as mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model, tokenizer = mlx_llama.load(args.model or mlx_llama.default_model(), dtype=mx.float32, cpu_dequantize=True)
    prompt = mx.array(tokenizer.encode("Tell me a story about a dragon. " * 4), mx.int32)

    def filled():  # a cache holding the prompt
        cache = model.make_cache()
        mx.eval(model(prompt[None], cache))
        return cache

    single, caches = filled(), [filled() for _ in range(args.rows)]

    def plain():
        mx.eval(model(mx.array([[5]], mx.int32), single)[:, -1])
        for layer in single:
            layer.trim(1)  # every step at the same position

    def batched(live: int):
        rows = [[caches[r][i] if r < live else None for r in range(args.rows)] for i in range(len(model.blk))]
        mx.eval(model(mx.zeros((args.rows, 1), mx.int32), rows)[:, -1])
        for r in range(live):
            for layer in caches[r]:
                layer.trim(1)

    cases = {"single sequence (generate)": (plain, 1), f"{args.rows} rows, 1 live": (lambda: batched(1), 1),
             f"{args.rows} rows, all live": (lambda: batched(args.rows), args.rows)}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for name, (step, _) in cases.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / 5)
    base = 1 / best["single sequence (generate)"]
    for name, (_, tokens) in cases.items():
        tps = tokens / best[name]
        print(f"{name}: {best[name] * 1000:.1f} ms/step, {tps:.1f} tok/s ({tps / base:.2f}x the single sequence)")


if __name__ == "__main__":
    main()
