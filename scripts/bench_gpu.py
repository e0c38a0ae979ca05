"""mlx_llama on an NVIDIA GPU against llama.cpp and mlx-lm: Llama-2-7B-shaped files, one run.

Writes the files (`bench_load.make_7b`, random weights, a real 32000-token vocabulary so that
llama.cpp loads them): Q4_0, and llama.cpp's Q4_K_M recipe (Q6_K for the output, attn_v and half
the ffn_down layers, Q4_K elsewhere). Then, in one process each and one after the other:
  mlx_llama    pp512 and tg128 (`mlx_llama.bench`: warm-up, then --reps runs), on each file;
               with --baseline also with its CUDA kernels off (MLX_LLAMA_CUDA_KERNELS=0: MLX's
               own quantized matmul), for the ratio;
  llama.cpp    its llama-bench (--llama-bench PATH) on the same files;
  mlx-lm       (--mlx-lm) the 7B shape built by mlx_lm.models.llama with random weights,
               quantized 4-bit, group 32 (its own quantization; the nearest peer to Q4_0);
and prints one table with ratios to llama.cpp. A check runs first (--check): the logits of a
2-layer file on the GPU against the float32 CPU model with the same compact weights. Order: the
defaults on both files, llama-bench, mlx-lm, then each variant (--baseline, --row, …) on Q4_0 and
the defaults on Q4_0 once more; the JSON is written after each row.

    python scripts/bench_gpu.py [--dir /tmp/bench7b] [--llama-bench PATH] [--mlx-lm] [--check] [--baseline] [--op-by-op] [--unfused] [--ahead] [--row 'NAME;VAR=VALUE;…']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

RECIPES = ("Q4_0", "Q4_K_M")


def make_files(directory: str, layers: int, vocab_from: str | None) -> dict[tuple[str, int], str]:
    from bench_load import make_7b

    os.makedirs(directory, exist_ok=True)
    paths = {}
    for recipe in RECIPES:
        for n in (2, layers):
            path = paths[recipe, n] = os.path.join(directory, f"llama2-7b-shape-random-{recipe}-{n}l.gguf")
            if not os.path.exists(path):
                t0 = time.perf_counter()
                make_7b(path, recipe, n, vocab_from)
                print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s", flush=True)
    return paths


def mlx_llama_worker(path: str, reps: int) -> dict:
    """In a child process: load the file, then `mlx_llama.bench.run`."""
    import mlx_llama  # noqa: F401
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_llama import bench
    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.loader import load_model

    t0 = time.perf_counter()
    model = load_model(GGUFFile(path))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    results = bench.run(model, 512, 128, reps)
    return {"load_s": load_s, "weights_gib": held / 2**30, "peak_gib": mx.get_peak_memory() / 2**30,
            **{r.test: [r.mean, r.sd] for r in results}}


def mlx_lm_worker(group_size: int, reps: int) -> dict:
    """mlx-lm's Llama at the 7B shape, random weights, 4-bit: pp512 and tg128 with its generate_step."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    args = llama.ModelArgs(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                           num_attention_heads=32, rms_norm_eps=1e-5, vocab_size=32000, tie_word_embeddings=False)
    model = llama.Model(args)
    model.update(nn.utils.tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(mx.float16), model.parameters()))
    nn.quantize(model, group_size=group_size, bits=4)
    mx.eval(model.parameters())
    prompt = mx.array(np.random.default_rng(0).integers(0, 32000, 512))
    pp, tg = [], []
    for _ in range(reps + 1):
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        mx.eval(model(prompt[None], cache=cache))
        pp.append(512 / (time.perf_counter() - t0))
        steps = generate_step(prompt[-1:], model, max_tokens=129, sampler=lambda x: mx.argmax(x, axis=-1))
        next(steps)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        tg.append(n / (time.perf_counter() - t0))
    pp, tg = pp[1:], tg[1:]
    return {"pp512": [float(np.mean(pp)), float(np.std(pp, ddof=1))], "tg128": [float(np.mean(tg)), float(np.std(tg, ddof=1))]}


def in_child(fn: str, *args, env: dict | None = None) -> dict:
    """Run `fn(*args)` of this script in a fresh process (its own memory and MLX state); a failure
    is raised (see `or_error`)."""
    code = f"import json, sys; sys.argv = ['x']; import bench_gpu; print('RESULT' + json.dumps(bench_gpu.{fn}(*{args!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=HERE,
                       env={**os.environ, **(env or {})})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"{fn}{args} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def or_error(fn: str, *args, env: dict | None = None) -> dict:
    """`in_child`, or {"error": the failure's last line}: one failing row leaves the others measured."""
    try:
        return in_child(fn, *args, env=env)
    except Exception as e:  # noqa: BLE001 - a child's crash (a kernel fault) or error, reported in the table
        print(f"{fn}{args} failed: {str(e)[-2000:]}", flush=True)
        return {"error": str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}


def llama_bench(binary: str, path: str, reps: int) -> dict:
    out = subprocess.run([binary, "-m", path, "-p", "512", "-n", "128", "-ngl", "99", "-r", str(reps), "-o", "json"],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    res = {}
    for row in json.loads(out.stdout):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] and not row["n_gen"] else f"tg{row['n_gen']}"
        res[test] = [row["avg_ts"], row["stddev_ts"]]
    res["build"] = f"{row.get('build_commit', '?')} ({row.get('backends', '?')})"
    return res


def check(path: str) -> dict:
    """GPU (default dtype and float32) against the float32 CPU model, same compact weights, 16 tokens."""
    import mlx_llama  # noqa: F401
    import mlx.core as mx
    import numpy as np

    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.loader import load_model

    tokens = mx.array([list(range(100, 1700, 100))])
    with mx.stream(mx.cpu):
        ref = np.array(load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=False)(tokens)[0])
    out = {"logit_scale": float(np.abs(ref).max())}
    for name, dtype in (("float32", mx.float32), ("float16", None)):
        model = load_model(GGUFFile(path), dtype=dtype, cpu_dequantize=False)
        ours = np.array(model(tokens)[0].astype(mx.float32))
        out[name] = {"top1_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean()), "max_abs_dlogit": float(np.abs(ours - ref).max()),
                     "decode_compiled_vs_op_by_op": decode_difference(model, tokens[0].tolist())}
    return out


def decode_difference(model, prompt: list[int], steps: int = 300) -> float:
    """max |Δlogit| between `steps` decode steps compiled (`decode_step`) and op by op, after
    the prompt's greedy token fed the same tokens (over a cache reallocation: 16 + 300 > 256)."""
    import mlx.core as mx
    import numpy as np

    from mlx_llama.decode_step import decoder
    from mlx_llama.generation import prefill

    runs = []
    for compiled in (False, True):
        cache = model.make_cache()
        y = mx.argmax(prefill(model, mx.array(prompt, mx.int32), cache), -1).astype(mx.int32)
        forward = decoder(model, cache, compiled)
        logits = []
        for i in range(steps):
            logits.append(forward(y).astype(mx.float32))
            y = mx.array([(prompt[0] + 7 * i) % model.config.vocab_size], mx.int32)  # the same tokens both ways
        runs.append(np.array(mx.concatenate(logits)))
    return float(np.abs(runs[0] - runs[1]).max())


def table(rows: list[tuple[str, dict]], ref: dict) -> str:
    lines = [f"| {'engine':44} | {'Q4_0 pp512':>14} | {'Q4_0 tg128':>12} | {'Q4_K_M pp512':>14} | {'Q4_K_M tg128':>12} |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        cells = []
        for recipe in RECIPES:
            for test in ("pp512", "tg128"):
                v = r.get(recipe, {}).get(test)
                base = ref.get(recipe, {}).get(test)
                if "error" in r.get(recipe, {}):
                    cells.append("error")
                    continue
                cells.append("—" if v is None else f"{v[0]:,.0f}" + (f" ({v[0] / base[0]:.2f}×)" if base else ""))
        lines.append(f"| {name:44} | {cells[0]:>14} | {cells[1]:>12} | {cells[2]:>14} | {cells[3]:>12} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--mlx-lm", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also mlx_llama with its CUDA kernels off")
    ap.add_argument("--op-by-op", action="store_true", help="also mlx_llama with the decode step not compiled")
    ap.add_argument("--ahead", action="store_true", help="also mlx_llama with 2 decode steps queued ahead "
                    "(MLX_LLAMA_DECODE_AHEAD=2)")
    ap.add_argument("--unfused", action="store_true", help="also mlx_llama with the fused decode kernels off "
                    "(MLX_LLAMA_CUDA_FUSE=none: MLX's add, norm, RoPE and activation; biases read)")
    ap.add_argument("--row", action="append", default=[], metavar="NAME;VAR=VALUE;…",
                    help="also mlx_llama with these environment variables (repeatable)")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--vocab-from", default=os.path.join(HERE, "..", "tests", ".cache", "vocab", "ggml-vocab-llama-spm.gguf"))
    args = ap.parse_args(argv)

    paths = make_files(args.dir, args.layers, args.vocab_from if os.path.exists(args.vocab_from) else None)
    results: dict = {}
    if args.check:
        for recipe in RECIPES:
            results[f"check {recipe}"] = or_error("check", paths[recipe, 2])
            print(f"check {recipe} (2 layers):", json.dumps(results[f"check {recipe}"]), flush=True)
    rows, ref = [], {}

    def save() -> None:  # after each row: a call cut short by its time limit keeps what it measured
        results["rows"] = rows
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)

    def measure(name: str, env: dict, recipes=RECIPES) -> None:
        r = {recipe: or_error("mlx_llama_worker", paths[recipe, args.layers], args.reps, env=env) for recipe in recipes}
        rows.append((name, r))
        print(name, json.dumps(r), flush=True)
        save()

    # the defaults first, llama.cpp and mlx-lm right after them: the table's ratios from one stretch
    # of the call (decode rates drift between calls and within one); the variants on Q4_0 after,
    # then the defaults on Q4_0 again, which shows the drift
    measure("mlx_llama", {})
    if args.llama_bench:
        try:
            ref = {recipe: llama_bench(args.llama_bench, paths[recipe, args.layers], args.reps) for recipe in RECIPES}
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # the table without ratios, the rest kept
            print(f"llama-bench failed: {str(e)[-2000:]}", flush=True)
        rows.append(("llama.cpp llama-bench (CUDA)", ref))
        print("llama.cpp", json.dumps(ref), flush=True)
        save()
    if args.mlx_lm:
        r = {"Q4_0": or_error("mlx_lm_worker", 32, args.reps)}
        rows.append(("mlx-lm 4-bit g32 (vs Q4_0)", r))
        print("mlx-lm g32", json.dumps(r), flush=True)
        save()
    variants = [("mlx_llama, CUDA kernels off", {"MLX_LLAMA_CUDA_KERNELS": "0"})] if args.baseline else []
    variants += [("mlx_llama, decode step op by op", {"MLX_LLAMA_COMPILE": "0"})] if args.op_by_op else []
    variants += [("mlx_llama, fused decode kernels off", {"MLX_LLAMA_CUDA_FUSE": "none"})] if args.unfused else []
    variants += [("mlx_llama, 2 decode steps queued ahead", {"MLX_LLAMA_DECODE_AHEAD": "2"})] if args.ahead else []
    for spec in args.row:
        name, *pairs = spec.split(";")
        variants.append((name, dict(pair.split("=", 1) for pair in pairs)))
    for name, env in variants:
        measure(name, env, ("Q4_0",))
    if variants:
        measure("mlx_llama again", {}, ("Q4_0",))
    print(table(rows, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
