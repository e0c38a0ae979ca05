"""mlx_llama on a GPU: a Llama-2-7B-shaped Q4_K_M GGUF (random weights), against llama.cpp's llama-bench.

Writes the file (`bench_load.make_7b`: llama.cpp's Q4_K_M recipe, Q6_K for the output, attn_v and
half the ffn_down layers), then for each form of the Q2_K/Q6_K tensors ("blocks", the default:
the file's blocks dequantized when used; "dense": float16) loads it with mlx_llama on MLX's
default device and measures in this process:
  load time, MLX memory held by the weights (and its ratio to the file's tensor bytes),
  prompt processing of 512 tokens and generation of 128 (greedy), tokens/s, best of --reps.
With --llama-bench PATH, llama.cpp's llama-bench runs on the same file (pp512, tg128) for the ratio.
A check runs first, on a 2-layer file of the same shape: the logits of the model on the default
device (float16 activations on a GPU) against the float32 CPU model, top-1 and max |Δ|.

    python scripts/bench_gpu.py [--dir /tmp/bench7b] [--layers 32] [--llama-bench PATH] [--forms blocks,dense]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx_llama  # noqa: E402  (before mlx.core: preloads a fast BLAS on the CPU)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from bench_load import make_7b  # noqa: E402
from mlx_llama import generation, quants  # noqa: E402
from mlx_llama.architectures import read_config  # noqa: E402
from mlx_llama.gguf_file import GGUFFile  # noqa: E402
from mlx_llama.loader import load_model  # noqa: E402
from mlx_llama.sample import SamplingParams  # noqa: E402


def run_once(model, prompt: list[int], gen: int) -> tuple[float, float, float, float]:
    """prompt and generation tokens/s, and the peak MLX memory (GiB) during each."""
    cache = model.make_cache()
    ids = mx.array(prompt, mx.int32)
    mx.eval(ids)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    logits = generation.prefill(model, ids, cache)
    mx.eval(logits, [c.state for c in cache])
    pp = time.perf_counter() - t0
    pp_peak = mx.get_peak_memory() / 2**30
    first = int(mx.argmax(logits, axis=-1).item())
    mx.reset_peak_memory()
    it = generation.generate_tokens(model, [first], SamplingParams(temp=0), gen + 1, cache=cache)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    tg = time.perf_counter() - t0
    return len(prompt) / pp, n / tg, pp_peak, mx.get_peak_memory() / 2**30


def bench_form(path: str, form: str, prompt: list[int], gen: int, reps: int) -> dict:
    quants.set_subblock16_form(form)
    mx.clear_cache()
    t0 = time.perf_counter()
    model = load_model(GGUFFile(path))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    runs = [run_once(model, prompt, gen) for _ in range(reps + 1)][1:]  # the first warms up
    out = {"form": form, "load_s": load_s, "mlx_weights_gib": held / 2**30,
           "pp_tps": max(r[0] for r in runs), "tg_tps": max(r[1] for r in runs),
           "pp_peak_gib": max(r[2] for r in runs), "tg_peak_gib": max(r[3] for r in runs)}
    del model
    quants.set_subblock16_form()
    return out


def gpu_vs_cpu(path: str, tokens: list[int]) -> dict:
    """The model on the default device in its compact form, in float32 and in its default dtype
    (float16 on a GPU), against the float32 CPU model: with the same compact weights (the GPU
    kernels against MLX's CPU ones: float32 rounding) and with every weight expanded exactly
    (adds the float16 rounding of Q4_K's scales in the compact form)."""
    with mx.stream(mx.cpu):
        refs = {name: np.array(load_model(GGUFFile(path), dtype=mx.float32, cpu_dequantize=expand)(mx.array([tokens]))[0])
                for name, expand in (("cpu_compact", False), ("cpu_expanded", True))}
    out = {"logit_scale": float(np.abs(refs["cpu_expanded"]).max())}
    for name, dtype in (("float32", mx.float32), ("default", None)):
        ours = np.array(load_model(GGUFFile(path), dtype=dtype, cpu_dequantize=False)(mx.array([tokens]))[0].astype(mx.float32))
        for ref_name, ref in refs.items():
            out[f"{name} vs {ref_name}"] = {"top1_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
                                            "max_abs_dlogit": float(np.abs(ours - ref).max())}
    return out


def llama_bench(binary: str, path: str, reps: int) -> dict:
    out = subprocess.run([binary, "-m", path, "-p", "512", "-n", "128", "-ngl", "99", "-r", str(reps), "-o", "json"],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        key = "pp_tps" if r["n_prompt"] and not r["n_gen"] else "tg_tps"
        res[key] = r["avg_ts"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--forms", default="blocks,dense")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--vocab-from", default=os.path.join(os.path.dirname(__file__), "..", "tests", ".cache", "vocab", "ggml-vocab-llama-spm.gguf"),
                    help="a GGUF whose 32000-token vocabulary the file gets (llama.cpp loads no file without one)")
    args = ap.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    paths = {}
    for layers in (2, args.layers):
        paths[layers] = os.path.join(args.dir, f"llama2-7b-shape-random-Q4_K_M-{layers}l.gguf")
        if not os.path.exists(paths[layers]):
            t0 = time.perf_counter()
            make_7b(paths[layers], "Q4_K_M", layers, args.vocab_from if os.path.exists(args.vocab_from) else None)
            print(f"wrote {paths[layers]} ({os.path.getsize(paths[layers]) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s", flush=True)
    path = paths[args.layers]
    f = GGUFFile(path)
    tensor_bytes = sum(t.data.nbytes for t in f.tensors.values())
    print(f"device: {mx.default_device()} | file tensors {tensor_bytes / 2**30:.2f} GiB", flush=True)

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, read_config(f).vocab_size, 512).tolist()
    print("check (2 layers):", json.dumps(gpu_vs_cpu(paths[2], prompt[:16])), flush=True)
    for form in filter(None, args.forms.split(",")):
        r = bench_form(path, form, prompt, args.gen, args.reps)
        print(f"mlx_llama {form:6} | load {r['load_s']:5.1f} s | weights {r['mlx_weights_gib']:.2f} GiB "
              f"({r['mlx_weights_gib'] * 2**30 / tensor_bytes:.2f}× file) | peak pp {r['pp_peak_gib']:.2f} / tg {r['tg_peak_gib']:.2f} GiB | "
              f"pp512 {r['pp_tps']:8.1f} tok/s | tg{args.gen} {r['tg_tps']:6.1f} tok/s", flush=True)
    if args.llama_bench:
        r = llama_bench(args.llama_bench, path, args.reps)
        print(f"llama.cpp (llama-bench) | pp512 {r.get('pp_tps', 0):8.1f} tok/s | tg128 {r.get('tg_tps', 0):6.1f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
