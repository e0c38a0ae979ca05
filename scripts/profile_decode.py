"""Where a decoded token's time goes, on a GPU: host time to build the step's graph, the ops in
it, the time of a synchronous step, the pipelined step (`generate_tokens`), and the weight
products alone; the step op by op and compiled (`decode_step`), each.

    python scripts/profile_decode.py MODEL.gguf [--context 512] [--steps 32]
    ncu --metrics gpu__time_duration.sum --csv --profile-from-start off \\
        python scripts/profile_decode.py MODEL.gguf --ncu [--compiled]   # kernels per token, GPU time

With --ncu only `--ncu-steps` decode steps run between cudaProfilerStart/Stop, so Nsight Compute
records exactly their kernels (count them, sum their durations; `--parse CSV` does it).
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import io
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


def build_and_step(forward, y):
    import mlx.core as mx

    t0 = time.perf_counter()
    nxt = mx.argmax(forward(y), axis=-1)
    built = time.perf_counter() - t0
    return nxt, built


def host_split(model, cache, y, n: int) -> str:
    """The compiled step's host time split in two, the host running ahead of the GPU (no step
    waited on until the last): building the step (`mx.compile`'s replay and the argmax) and
    submitting it (`mx.async_eval`: MLX evaluates each primitive on the host — kernel nodes
    added to CUDA graphs, the graphs updated and launched); then the wall time per step, which
    is the GPU's when the host time is less."""
    import mlx.core as mx
    import numpy as np

    from mlx_llama.decode_step import decoder

    forward = decoder(model, cache, True)
    for _ in range(3):
        y, _ = build_and_step(forward, y)
        mx.eval(y)
    built, submitted = [], []
    t0 = time.perf_counter()
    for _ in range(n):
        y, b = build_and_step(forward, y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        submitted.append(time.perf_counter() - t1)
        built.append(b)
    host = time.perf_counter() - t0
    mx.eval(y)
    wall = time.perf_counter() - t0
    q = lambda v: "/".join(f"{x * 1e3:.2f}" for x in np.percentile(v, [10, 50, 90]))
    return (f"compiled, host ahead ({n} steps): build {q(built)} ms, submit {q(submitted)} ms (p10/p50/p90); "
            f"host {host / n * 1e3:.2f} ms per step, wall {wall / n * 1e3:.2f} ms per step = {n / wall:.1f} tok/s")


def steps(model, cache, y, n: int, compiled: bool):
    """Host build and synchronous step times of n steps, and the pipelined rate of n more
    (`generate_tokens`, with MLX_LLAMA_COMPILE set to match)."""
    import mlx.core as mx

    from mlx_llama.decode_step import decoder
    from mlx_llama.generation import generate_tokens
    from mlx_llama.sample import SamplingParams

    forward = decoder(model, cache, compiled)
    for _ in range(3):  # warm up: kernels compiled, the step traced
        y, _ = build_and_step(forward, y)
        mx.eval(y)
    built, synced = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        y, b = build_and_step(forward, y)
        mx.eval(y)
        synced.append(time.perf_counter() - t0)
        built.append(b)
    os.environ["MLX_LLAMA_COMPILE"] = "1" if compiled else "0"
    it = generate_tokens(model, [int(y.item())], SamplingParams(temp=0), n + 1, cache=cache)
    next(it)
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    return built, synced, (time.perf_counter() - t0) / count


def graph_ops(model, cache, y) -> collections.Counter:
    """The primitives of one decode step's graph (an upper bound on its kernels: reshapes and
    broadcasts launch none), from MLX's DOT export."""
    import mlx.core as mx

    out = mx.argmax(model(y[None], cache)[:, -1, :], axis=-1)
    buf = io.StringIO()
    mx.export_to_dot(buf, out)
    labels = [line.split('label ="')[1].split('"')[0] for line in buf.getvalue().splitlines() if 'shape=rectangle' in line]
    for c in cache:  # undo the step's cache write: the graph was only built for counting
        c.trim(1)
    return collections.Counter(labels)


def weight_products_alone(model) -> tuple[float, int]:
    """All the layers' weight products for one token, evaluated together (the issue's 4.36 ms):
    the seconds per token, and how many products."""
    import mlx.core as mx

    def in_features(m) -> int:
        if "d" in m:  # Q2_K/Q6_K blocks
            return m["d"].shape[1] * 256
        return m["weight"].shape[-1] * 32 // m.bits if hasattr(m, "bits") else m["weight"].shape[-1]

    layers = [m for path, m in model.named_modules() if ("scales" in m or "d" in m) and path != "token_embd"]
    if model.tied_embeddings:
        layers.append(model.token_embd)  # the table projects onto the vocabulary
    xs = {k: mx.random.normal((1, 1, k)).astype(model.dtype) for k in {in_features(m) for m in layers}}

    def run():
        mx.eval([m.as_linear(xs[in_features(m)]) if m is model.token_embd else m(xs[in_features(m)]) for m in layers])

    run()
    t0 = time.perf_counter()
    for _ in range(10):
        run()
    return (time.perf_counter() - t0) / 10, len(layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ncu-steps", type=int, default=2)
    ap.add_argument("--compiled", action="store_true", help="with --ncu: the compiled step")
    ap.add_argument("--parse", default=None, help="an ncu --csv output: kernels and GPU time per token")
    ap.add_argument("--host", action="store_true", help="only the compiled step's host time, built and submitted")
    args = ap.parse_args(argv)
    if args.parse:
        return parse_ncu(args.parse, args.ncu_steps)

    import mlx_llama  # noqa: F401
    import mlx.core as mx
    import numpy as np

    from mlx_llama.decode_step import decoder
    from mlx_llama.generation import prefill
    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.loader import load_model

    model = load_model(GGUFFile(args.model))
    mx.eval(model.parameters())
    cache = model.make_cache()
    prompt = mx.array(np.random.default_rng(0).integers(0, model.config.vocab_size, args.context), mx.int32)
    y = mx.argmax(prefill(model, prompt, cache), axis=-1)
    mx.eval(y, [c.state for c in cache])
    if args.ncu:
        forward = decoder(model, cache, args.compiled)
        for _ in range(3):  # warm up: kernels compiled, caches grown, the step traced
            y, _ = build_and_step(forward, y)
            mx.eval(y)
        cudart = ctypes.CDLL("libcudart.so.13")
        mx.synchronize()
        cudart.cudaProfilerStart()
        for _ in range(args.ncu_steps):
            y, _ = build_and_step(forward, y)
            mx.eval(y)
        mx.synchronize()
        cudart.cudaProfilerStop()
        return 0
    if args.host:
        print(host_split(model, cache, y, args.steps))
        return 0
    ops = graph_ops(model, cache, y)
    print(f"model: {args.model}, {args.context} tokens cached, device {mx.default_device()}")
    for compiled in (False, True):
        built, synced, pipelined = steps(model, cache, y, args.steps, compiled)
        print(f"{'compiled' if compiled else 'op by op'}: host time to build one step: {np.median(built) * 1e3:.2f} ms "
              f"(median of {args.steps}); built and evaluated synchronously: {np.median(synced) * 1e3:.2f} ms; "
              f"pipelined decode (generate_tokens): {pipelined * 1e3:.2f} ms per token = {1 / pipelined:.1f} tok/s")
    alone, n_layers = weight_products_alone(model)
    print(f"the {n_layers} weight products alone, evaluated together: {alone * 1e3:.2f} ms")
    print(f"graph primitives per step: {sum(ops.values())} — " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
    return 0


def parse_ncu(path: str, steps: int) -> int:
    """Kernels per decoded token and their summed GPU time, from `ncu --csv --metrics gpu__time_duration.sum`."""
    with open(path, newline="") as fh:
        text = fh.read()
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    total = 0.0
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", "")) * (1e3 if r["Metric Unit"] == "usecond" else 1e6 if r["Metric Unit"] == "msecond" else 1)
        name = r["Kernel Name"].split("(")[0][:60]
        per_kernel[name][0] += 1
        per_kernel[name][1] += ns
        total += ns
    n = sum(v[0] for v in per_kernel.values())
    print(f"kernels per decoded token: {n / steps:.0f}; GPU time per token (sum of kernel durations): {total / steps / 1e6:.3f} ms")
    for name, (count, ns) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {count / steps:6.0f} × {name:60} {ns / steps / 1e3:8.1f} µs/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
