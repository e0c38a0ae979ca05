#!/usr/bin/env python3
"""The distributed acceptance figures (issue 18): each mode and rank count against one process.

    python scripts/check_distributed.py [-m MODEL] [--ranks 2 3] [--modes pipeline tensor]
                                        [--ctx 512] [--chunks 4] [--greedy 48] [--memory-only]
                                        [--backend ring|nccl] [--dtype float32|float16]

For each configuration the ranks are started on this machine with `mlx.launch` (each running
this script with --worker); the one-process figures come from a worker run alone. The backend is
NCCL where MLX has CUDA (one rank per GPU; NCCL_NVLS_ENABLE=0 unless set), else the ring over
local processes. Two GPUs of one host (issue 19):

    python scripts/check_distributed.py -m FILE.gguf --ranks 2 --dtype float16 --chunks 0

Printed per configuration: max |Δlogit| over the first 64 tokens of botchan.txt (float32),
whether `--greedy` greedy tokens are identical, the perplexity of `--chunks` chunks of
botchan.txt (llama.cpp's method), and each rank's MLX memory after loading as a share of the
one-process figure. `--make-24-layers PATH` writes the random-weight file the memory figures
are measured on (24 layers, untied vocabulary, F16: 464 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

import mlx_llama  # noqa: E402  (before mlx.core: the fast BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

PROMPT = "The capital of France is"
DTYPES = {"float32": mx.float32, "float16": mx.float16}


def worker(args) -> None:
    """One rank (or the single process): measure, and write what rank 0 has to args.out."""
    from mlx_llama import distributed

    cpu = {"auto": None, "on": True, "off": False}[args.cpu_dequantize]
    if args.mode == "single":
        model, tokenizer = mlx_llama.load(args.model, dtype=DTYPES[args.dtype], cpu_dequantize=cpu)
        rank = 0
    else:
        world = distributed.connect()
        try:
            model, tokenizer = distributed.load(args.model, args.mode, world, dtype=DTYPES[args.dtype],
                                                cpu_dequantize=cpu, reduce=args.reduce)
        except mlx_llama.MlxLlamaError as e:  # a refused split: every rank has it, rank 0 says it
            if world.rank == 0:
                print(f"mlx_llama: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        rank = world.rank
    mx.clear_cache()
    out = Path(args.out)
    (out / f"memory{rank}.json").write_text(json.dumps(mx.get_active_memory()))
    if args.memory_only:
        return
    got = measure(model, tokenizer, Path(args.text).read_text(encoding="utf-8", errors="replace"), args)
    if rank == 0:
        np.save(out / "logits.npy", got.pop("logits"))
        (out / "result.json").write_text(json.dumps(got))


def measure(model, tokenizer, text: str, args) -> dict:
    """Logits of the text's first 64 tokens, `args.greedy` greedy tokens after PROMPT, and the
    perplexity of `args.chunks` chunks of `args.ctx` tokens (rank 0's are the run's)."""
    from mlx_llama.generation import generate_tokens
    from mlx_llama.perplexity import perplexity
    from mlx_llama.sample import SamplingParams

    ids = tokenizer.encode(text, add_special=True, parse_special=False)[:64]
    logits = np.array(model(mx.array([ids])).astype(mx.float32))
    prompt = tokenizer.encode(PROMPT, add_special=True, parse_special=False)
    greedy = list(generate_tokens(model, prompt, SamplingParams(temp=0), args.greedy))
    ppl = perplexity(model, tokenizer, text, ctx=args.ctx, chunks=args.chunks) if args.chunks else None
    return {"logits": logits, "greedy": greedy, "ppl": ppl.value if ppl else None}


def run(model: str, mode: str, ranks: int, opts: list[str], backend: str = "ring") -> dict:
    """The measurements of one configuration (ranks started by mlx.launch on this machine)."""
    out = tempfile.mkdtemp(prefix="check-dist-")
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "-m", model, "--out", out, *opts]
    if mode != "single":
        launcher = str(Path(sys.executable).with_name("mlx.launch"))
        ports = ["--starting-port", str(free_ports(ranks))] if backend == "ring" else []
        cmd = [launcher, "-n", str(ranks), "--backend", backend, *ports, "--", *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    memory = [json.loads(p.read_text()) for p in sorted(Path(out).glob("memory*.json"))]
    result = {"memory": memory}
    if (Path(out) / "result.json").exists():
        result |= json.loads((Path(out) / "result.json").read_text())
        result["logits"] = np.load(Path(out) / "logits.npy")
    elif "--memory-only" not in opts or r.returncode:
        errors = [line for line in r.stderr.splitlines() if line.startswith("mlx_llama: error:")]
        result["failed"] = errors[0] if errors else f"exit status {r.returncode}: {r.stderr[-2000:]}"
    return result


def free_ports(n: int) -> int:
    """The first of n consecutive ports free on this machine (mlx.launch's ring takes n from it)."""
    for base in random.Random().sample(range(20000, 60000, 16), 200):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    stack.enter_context(socket.create_server(("127.0.0.1", port))).close()
            return base
        except OSError:
            continue
    raise SystemExit("no free ports for the ring")


def make_24_layers(path: str) -> None:
    from make_fixture import make_tiny

    make_tiny(path, tensor_type="F16", n_layers=24, hidden=768, n_heads=12, n_kv_heads=6, ffn=2048, tied=False)


def ppl(result: dict) -> str:
    return "—" if result["ppl"] is None else f"{result['ppl']:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    p.add_argument("--modes", nargs="+", default=["pipeline", "tensor"], choices=["pipeline", "tensor"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--greedy", type=int, default=48)
    p.add_argument("--cpu-dequantize", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--reduce", choices=["gather", "sum"], default="gather", help="tensor parallel: how shares are joined")
    p.add_argument("--backend", choices=["ring", "nccl"], default="nccl" if mx.cuda.is_available() else "ring")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="activations (and dense weights)")
    p.add_argument("--make-24-layers", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--text", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_24_layers:
        make_24_layers(args.make_24_layers)
        return 0
    if args.worker:
        worker(args)
        return 0
    from resources import botchan

    model = args.model or mlx_llama.default_model()
    opts = ["--text", str(botchan()), "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--greedy", str(args.greedy),
            "--cpu-dequantize", args.cpu_dequantize, "--dtype", args.dtype, "--reduce", args.reduce] + (["--memory-only"] if args.memory_only else [])
    single = run(model, "single", 1, opts)
    if not args.memory_only:
        print(f"one process: perplexity {ppl(single)}, greedy {len(single['greedy'])} tokens", flush=True)
    print("| mode | ranks | max abs Δlogit | greedy identical | perplexity | weight memory per rank (share of one process) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in args.modes:
        for n in args.ranks:
            got = run(model, mode, n, opts, args.backend)
            if "failed" in got:  # e.g. a key/value head count that does not split over n ranks
                print(f"| {mode} | {n} | {got['failed']} | | | |")
                continue
            shares = ", ".join(f"{m / single['memory'][0]:.3f}" for m in got["memory"])
            if args.memory_only:
                print(f"| {mode} | {n} | | | | {shares} (limit {1 / n + 0.05:.3f}) |")
                continue
            delta = float(np.abs(got["logits"] - single["logits"]).max())
            print(f"| {mode} | {n} | {delta:.2e} | {got['greedy'] == single['greedy']} | {ppl(got)} | "
                  f"{shares} (limit {1 / n + 0.05:.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
