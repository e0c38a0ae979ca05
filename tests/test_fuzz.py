"""Seeded mutation fuzzing of a tiny GGUF (`scripts/make_fixture.py`, ~100 KB with its own small
vocabulary and chat template): every mutant (`fuzz_mutations`: 720 over 12 kinds, the first 360
of them in the default run, all with `-m slow`, and SmolLM2's) run through
`mlx_llama generate` as a user runs it must give the base file's output or exactly one GGUFError
line naming the file — no traceback, no second line, no hang past the time cap, no memory past
the cap. Cases run in two worker processes (`fuzz_worker.py`) with their memory capped; a
worker whose case runs past the cap is killed, and that case counts as a hang.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from fuzz_mutations import KINDS, mutants
from gguf_layout import ARRAY, U8, assemble, encode, entries, kv, parse, patch
from make_fixture import make_tiny, make_tiny_vocab
from test_tokenizer import report

HERE = Path(__file__).resolve().parent
SEED, WORKERS = 13, 2
PER_KIND, SAMPLE_PER_KIND = 60, 30  # mutants of each kind: the corpus (slow); the default run's first part of it
CASE_SECONDS, MEMORY_CAP_MB = 10.0, 512  # per case: time cap (a hang), memory above the worker's resting size
ARGS = ["generate", "the cat sat on the", "-n", "6", "--temp", "0"]  # chat mode: the file's template is used


class Worker:
    """One worker process, answering one JSON line per path."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, MLX_LLAMA_BLAS_WARNING="off")
        self.p = subprocess.Popen([sys.executable, str(HERE / "fuzz_worker.py"), json.dumps(args), str(MEMORY_CAP_MB)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.buffer = b""

    def run(self, path: str, seconds: float) -> dict:
        self.p.stdin.write(path.encode() + b"\n")
        self.p.stdin.flush()
        deadline = time.monotonic() + seconds
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                return dict(rc="hang", stdout="", stderr=f"no answer within {seconds} s", seconds=seconds, rss_mb=0)
            chunk = os.read(self.p.stdout.fileno(), 1 << 16)
            if not chunk:
                return dict(rc=f"worker died ({self.p.wait()})", stdout="", stderr="", seconds=0, rss_mb=0)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        self.p.kill()
        self.p.wait()


def run_all(base: Path, cases: Iterable[tuple[Path, bytes | None]], args: list[str] = ARGS) -> tuple[dict, list[dict]]:
    """The base file's result, and each case's, from WORKERS workers (each sees the base first).
    A case is a path and the bytes to write there first (then it is deleted: SmolLM2's mutants
    are 100 MB each) or None for a file that is there; they are made one at a time, in order."""
    cases, lock = iter(enumerate(cases)), threading.Lock()
    results: dict[int, dict] = {}
    bases: list = []

    def slot():
        worker = Worker(args)
        bases.append(worker.run(str(base), 120))  # warms the worker up; then its memory is capped
        # a hang is a case past the cap, or past 4× the base file's run where that is longer
        # (a real model on a busy machine)
        seconds = max(CASE_SECONDS, 4 * bases[-1]["seconds"])
        while True:
            with lock:
                i, (path, data) = next(cases, (None, (None, None)))
                if path is not None and data is not None:
                    path.write_bytes(data)
            if path is None:
                break
            results[i] = worker.run(str(path), seconds)
            if data is not None:
                path.unlink()
            if results[i]["rc"] == "hang" or str(results[i]["rc"]).startswith("worker died"):
                worker.close()
                worker = Worker(args)
                worker.run(str(base), 120)
        worker.close()

    threads = [threading.Thread(target=slot) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(b == bases[0] or (b["stdout"], b["rc"]) == (bases[0]["stdout"], bases[0]["rc"]) for b in bases)
    return bases[0], [results[i] for i in range(len(results))]


def outcome(result: dict, base: dict, path: str) -> str:
    lines = result["stderr"].splitlines()
    if result["rc"] == 0 and result["stdout"] == base["stdout"] and len(lines) == 1 and lines[0].startswith("prompt: "):
        return "same output"
    if (result["rc"] == 2 and result["stdout"] == "" and len(lines) == 1
            and lines[0].startswith(f"mlx_llama: error: {path}: ")):
        return "clean error"
    if result["rc"] == 0:
        return "DIFFERENT OUTPUT"
    return {"hang": "HANG"}.get(result["rc"], "TRACEBACK OR NOT ONE LINE")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    vocab = make_tiny_vocab(d / "vocab.gguf")
    return make_tiny(d / "base.gguf", tensor_type={"default": "Q4_1", "token_embd": "Q8_0"}, vocab_from=vocab)


def fuzz(base_file: Path, tmp_path: Path, capsys, per_kind: int, args: list[str] = ARGS) -> None:
    """Run `per_kind` mutants of each kind of `base_file`; report the table; fail on any other outcome."""
    start = time.perf_counter()
    labels: list[tuple[str, str, Path]] = []

    def cases():
        for i, (kind, what, data) in enumerate(mutants(base_file.read_bytes(), per_kind, SEED)):
            labels.append((kind, what, tmp_path / f"m{i:04d}.gguf"))
            yield labels[-1][2], data

    base, results = run_all(base_file, cases(), args)
    assert {k for k, _, _ in labels} == set(KINDS)
    assert base["rc"] == 0 and base["stdout"].strip(), base  # the base file runs
    table: dict[str, Counter] = {}
    bad = []
    for (kind, what, path), r in zip(labels, results, strict=True):
        o = outcome(r, base, str(path))
        table.setdefault(kind, Counter())[o] += 1
        if o not in ("same output", "clean error") or r["rss_mb"] > MEMORY_CAP_MB:
            bad.append(f"{kind}: {what}: {o}, {r['seconds']:.2f}s, +{r['rss_mb']:.0f} MB: rc {r['rc']} "
                       f"stdout {r['stdout'][:80]!r} stderr {r['stderr'][-400:]!r}")
    slowest = max(results, key=lambda r: r["seconds"])
    report(capsys, f"fuzz {base_file.name}: {len(labels)} mutants, seed {SEED}, {time.perf_counter() - start:.0f}s; "
                   f"slowest case {slowest['seconds']:.2f}s, peak RSS above the worker's rest "
                   f"{max(r['rss_mb'] for r in results):.0f} MB")
    report(capsys, f"{'kind':28} cases  clean error  same output  other")
    for kind, c in table.items():
        other = sum(c.values()) - c["clean error"] - c["same output"]
        report(capsys, f"{kind:28} {sum(c.values()):5}  {c['clean error']:11}  {c['same output']:11}  {other:5}")
    assert not bad, "\n".join(bad[:20])


def test_a_sample_of_mutants_gives_the_base_output_or_one_error_line(base_file, tmp_path, capsys):
    """The default run: the corpus's first 30 mutants of each kind (360, a few seconds)."""
    assert SAMPLE_PER_KIND * len(KINDS) >= 300
    fuzz(base_file, tmp_path, capsys, SAMPLE_PER_KIND)


@pytest.mark.slow
def test_mutant_corpus_gives_the_base_output_or_one_error_line(base_file, tmp_path, capsys):
    fuzz(base_file, tmp_path, capsys, PER_KIND)


@pytest.mark.slow
def test_smollm2_mutants(smollm2_path, tmp_path, capsys):
    """The same on the real file: a BPE vocabulary with merges, a real template (compact weights,
    so that a worker holds two models within the memory cap)."""
    fuzz(smollm2_path, tmp_path, capsys, 10, ARGS + ["--no-cpu-dequantize"])


def test_the_memory_cap_stops_a_blow_up(tmp_path):
    """The harness itself: a case that needs more than the cap fails as that case (MemoryError)
    instead of taking the machine's memory. A valid header whose 80 MB array becomes 80M list items."""
    n = 80 << 20
    blob = encode("x.blob", ARRAY, [], U8)  # key, type, item type, count 0
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + blob[:-8] + struct.pack("<Q", n) + bytes(n))
    empty = tmp_path / "empty.gguf"  # the workers' first case: a file with nothing in it
    empty.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    _, results = run_all(empty, [(big, None)])
    assert results[0]["rc"] == "traceback" and "MemoryError" in results[0]["stderr"], results[0]


def hang_cases(data: bytes) -> dict[str, bytes]:
    """The issue's hang cases, on the base file: each hung gguf's reader (or the loader) with
    memory growing into gigabytes."""
    L = parse(data)
    kvs, infos = entries(L)
    scores = kv(L, "tokenizer.ggml.scores")
    count_at = next(at for at, _ in L.fields["array count"] if scores.start < at < scores.end)
    blocks = kv(L, "llama.block_count")
    blob = encode("x.blob", ARRAY, [0] * 16, U8)
    claimed = blob[:-16 - 8] + struct.pack("<Q", len(data)) + blob[-16:]  # a count of the file's length
    return {
        "numeric array count 2^50": patch(data, count_at, struct.pack("<Q", 2**50)),
        "block_count 10^9": patch(data, blocks.end - 4, struct.pack("<I", 10**9)),
        "uint8 array count = file size": assemble(L, kvs + [claimed], infos),
        "uint8 array as long as the file (valid)": assemble(L, kvs + [encode("x.blob", ARRAY, [7] * len(data), U8)], infos),
    }


def test_the_issues_hang_cases_finish_in_two_seconds(base_file, tmp_path, capsys):
    cases = hang_cases(base_file.read_bytes())
    paths = []
    for i, data in enumerate(cases.values()):
        paths.append(tmp_path / f"hang{i}.gguf")
        paths[-1].write_bytes(data)
    base, results = run_all(base_file, [(p, None) for p in paths])
    for (name, _), path, r in zip(cases.items(), paths, results):
        expected = "same output" if "(valid)" in name else "clean error"
        assert outcome(r, base, str(path)) == expected, (name, r)
        start = time.perf_counter()  # and as a user runs it: a fresh interpreter, imports included
        cli = subprocess.run([sys.executable, "-m", "mlx_llama", *ARGS, "-m", str(path)], capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, MLX_LLAMA_BLAS_WARNING="off"))
        wall = time.perf_counter() - start
        assert cli.stdout == r["stdout"] and cli.returncode == r["rc"]
        assert r["seconds"] < 2 and r["rss_mb"] < MEMORY_CAP_MB, (name, r)
        message = r["stderr"].strip().replace(str(path), "FILE")
        report(capsys, f"{name:40} {r['seconds']:.3f}s in the worker, {wall:.2f}s as a command | {message[:90]}")
