"""Distributed runs on this machine: 2 and 3 processes on the ring backend over localhost.

Each rank is a process started as `mlx.launch` starts them (`ranks.Ranks`: MLX_RANK and a
hostfile), with its output kept apart so that rank 0's can be checked alone. The single-process
figures are computed here, in the test process, with the same functions
(`scripts/check_distributed.py`). Ranks share the machine's 2 cores, and MLX's ring backend
spins while it waits, so the models are small and the runs short; the SmolLM2 figures are the
`slow` tests at the end (`python -m pytest -m slow tests/test_distributed_runs.py`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from check_distributed import measure
from gguf_edit import rewrite_gguf
from ranks import ROOT, Ranks
from resources import botchan

SCRIPT = str(ROOT / "scripts" / "check_distributed.py")
ERROR = "mlx_llama: error: "


def worker(model, mode: str, n: int, tmp_path: Path, *opts, env=None) -> dict:
    """Rank 0's measurements (and every rank's weight memory) from an n-rank run."""
    out = tmp_path / f"{mode}{n}"
    out.mkdir(parents=True)
    run = Ranks([SCRIPT, "--worker", "--mode", mode, "-m", str(model), "--out", str(out), "--text", str(botchan()),
                 *opts], n, env=env)
    results = run.wait(timeout=600)
    assert all(rc == 0 for rc, _, _ in results), results
    got = {"memory": [json.loads((out / f"memory{r}.json").read_text()) for r in range(n)]}
    if (out / "result.json").exists():
        got |= json.loads((out / "result.json").read_text()) | {"logits": np.load(out / "logits.npy")}
    return got


def single(model, **settings) -> dict:
    m, tokenizer = mlx_llama.load(model, dtype=mx.float32, cpu_dequantize=settings.pop("cpu_dequantize", None))
    return measure(m, tokenizer, botchan().read_text(encoding="utf-8", errors="replace"), Namespace(**settings))


def assert_same_run(got: dict, ref: dict, exact: bool, tolerance: float = 1e-4) -> None:
    """Logits within `tolerance` (when `exact`: within float32 rounding, 2e-6 of the logits' scale —
    the same sums; a BLAS may still order a split matrix's products otherwise: OpenBLAS on an AMD
    EPYC differs by ~6e-7 of the scale where an Intel CPU gave the same bits), the same greedy
    tokens, the same perplexity (to 4 decimals; a random model's is ~1e6, where float32 sums in
    another order move it by ~1e-7 of its value)."""
    delta = np.abs(got["logits"] - ref["logits"]).max()
    assert delta <= (2e-6 * np.abs(ref["logits"]).max() if exact else tolerance), delta
    assert got["greedy"] == ref["greedy"]
    if ref["ppl"] is not None:
        assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6, abs=5e-5)


# -- the same numbers as one process --------------------------------------------------------------

RUN = dict(ctx=64, chunks=4, greedy=48)
OPTS = ["--ctx", "64", "--chunks", "4", "--greedy", "48"]


@pytest.fixture(scope="module")
def tiny_files(tiny_gguf):
    """A tied Q4_1 and an untied F32 fixture, heads that split over 2 and 3 ranks (6 kv heads)."""
    shape = dict(n_layers=4, hidden=96, n_heads=6, n_kv_heads=6, ffn=192)
    return {"tied": tiny_gguf("Q4_1", tied=True, **shape), "untied": tiny_gguf("F32", tied=False, **shape)}


SLOW = pytest.mark.slow  # the default run keeps one case of each kind (the suite's time budget)


# "all_sum": everything through all_sum, as over NCCL (pipeline hops, gathered logits).
# reduce: tensor parallelism's "gather" (bit for bit one process) or "sum" (partial sums, ~1e-6 here)
@pytest.mark.parametrize("mode, n, which, collectives, reduce", [
    ("pipeline", 3, "tied", "p2p", None), ("tensor", 2, "tied", "p2p", "gather"), ("tensor", 3, "tied", "p2p", "sum"),
    pytest.param("pipeline", 2, "untied", "all_sum", None, marks=SLOW),
    pytest.param("tensor", 3, "untied", "p2p", "gather", marks=SLOW),
    pytest.param("tensor", 2, "untied", "all_sum", "gather", marks=SLOW),
    pytest.param("tensor", 2, "untied", "all_sum", "sum", marks=SLOW)])
def test_tiny_fixture_as_one_process(tiny_files, tmp_path, mode, n, which, collectives, reduce):
    path = tiny_files[which]
    env = {"MLX_LLAMA_ALL_SUM_ONLY": "1"} if collectives == "all_sum" else None
    opts = [*OPTS, "--reduce", reduce] if reduce else OPTS
    assert_same_run(worker(path, mode, n, tmp_path, *opts, env=env), single(path, **RUN), exact=reduce != "sum")


def random_block_file(tiny_gguf, tmp_path) -> Path:
    """Q4_K projections, Q6_K attn_output, ffn_down and embeddings (random blocks, small scales):
    over 3 ranks each holds 4 heads of 64 = one super-block of attn_output's columns, and 2 of
    ffn_down's 6; over 2, attn_output's 6 heads (384 columns) fall inside a super-block."""
    from bench_load import T_Q4_K, T_Q6_K, random_blocks

    import gguf

    src = tiny_gguf("F32", n_layers=2, hidden=768, n_heads=12, n_kv_heads=6, ffn=1536)
    from mlx_llama.gguf_file import GGUFFile

    rng, retype = np.random.default_rng(1), {}
    for name, t in GGUFFile(src).tensors.items():
        if len(t.shape) == 2:
            q = T_Q6_K if name.split(".")[-2] in ("token_embd", "attn_output", "ffn_down") else T_Q4_K
            retype[name] = (gguf.GGMLQuantizationType(q), random_blocks(rng, *t.shape, q))
    dst = tmp_path / "blocks.gguf"
    rewrite_gguf(src, dst, retype=retype)
    return dst


def test_uneven_shares_are_gathered_in_order(tiny_gguf, tmp_path):
    """FFN units that do not split evenly (5 groups of 32 over 3 ranks: 32, 64, 64) and a hidden
    size that does not (100 over 3: 34, 34, 32): the gathered pieces put back in rank order."""
    path = tiny_gguf("F32", n_layers=2, hidden=100, n_heads=3, n_kv_heads=3, ffn=160, head_dim=32)
    opts = ["--ctx", "32", "--chunks", "0", "--greedy", "8"]
    assert_same_run(worker(path, "tensor", 3, tmp_path, *opts), single(path, ctx=32, chunks=0, greedy=8), exact=True)


@SLOW  # the unit tests check each form's shares (test_distributed.py); this, the whole model
@pytest.mark.parametrize("n", [2, 3])
def test_compact_blocks_and_affine_split_exactly(tiny_gguf, tmp_path, n):
    """The weights kept compact (Q6_K blocks, Q4_K affine) give the one-process logits."""
    path = random_block_file(tiny_gguf, tmp_path)
    opts = ["--ctx", "32", "--chunks", "0", "--greedy", "4", "--cpu-dequantize", "off"]
    ref = single(path, ctx=32, chunks=0, greedy=4, cpu_dequantize=False)
    for reduce in ("gather", "sum"):
        got = worker(path, "tensor", n, tmp_path / reduce, *opts, "--reduce", reduce)
        delta = np.abs(got["logits"] - ref["logits"]).max()
        assert delta == 0 if reduce == "gather" else delta <= 1e-4, (reduce, delta)


# -- weight memory: each rank holds its share ------------------------------------------------------


@pytest.fixture(scope="module")
def layers24(tiny_gguf, tmp_path_factory):
    """A 24-layer file whose layers outweigh its vocabulary, and its one-process MLX memory."""
    path = tiny_gguf("F16", n_layers=24, hidden=384, n_heads=6, n_kv_heads=6, ffn=1024, tied=True)
    return path, worker(path, "single", 1, tmp_path_factory.mktemp("single"), "--memory-only")["memory"][0]


@pytest.mark.parametrize("mode, n", [("pipeline", 2), ("tensor", 2), pytest.param("pipeline", 3, marks=SLOW),
                                     pytest.param("tensor", 3, marks=SLOW)])
def test_each_rank_holds_its_share(layers24, tmp_path, mode, n):
    """MLX memory after loading (the few-hundred-MB figure is `test_memory_24_layers_few_hundred_mb`, slow)."""
    path, whole = layers24
    shares = [m / whole for m in worker(path, mode, n, tmp_path, "--memory-only")["memory"]]
    assert len(shares) == n and max(shares) <= 1 / n + 0.05, shares


# -- the command line -----------------------------------------------------------------------------


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=300)


def test_generate_with_mlx_launch(tiny_files):
    """`mlx.launch … mlx_llama generate --pipeline`: rank 0 alone prints, the same text."""
    args = ["generate", "--raw", "Once upon a time", "-n", "24", "--temp", "0", "-m", str(tiny_files["untied"])]
    launcher = str(Path(sys.executable).with_name("mlx.launch"))
    port = str(41000 + int(time.time()) % 1000 * 10)
    r = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--starting-port", port, "--", sys.executable, "-m",
                        "mlx_llama", *args, "--pipeline"], capture_output=True, text=True, timeout=300,
                       env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    alone = cli(args)
    assert r.stdout == alone.stdout and alone.stdout.strip()
    assert r.stderr.count("prompt:") == 1 and "error" not in r.stderr


@SLOW
def test_perplexity_command(tiny_files):
    args = ["perplexity", "-f", str(botchan()), "--ctx", "64", "--chunks", "4", "-m", str(tiny_files["tied"])]
    results = Ranks(["-m", "mlx_llama", *args, "--pipeline"], 3).wait(timeout=300)
    final = [line for line in results[0][1].splitlines() if line.startswith("Final estimate")]
    assert final == [line for line in cli(args).stdout.splitlines() if line.startswith("Final estimate")] != []
    assert [(rc, out, err) for rc, out, err in results[1:]] == [(0, "", "")] * 2


def test_chat_lines_reach_every_rank(tiny_files):
    """Rank 0 reads the lines; every rank answers them alike (tensor parallel needs them all).
    Everything through all_sum, as over NCCL."""
    args = ["chat", "--chat-template", "chatml", "-n", "12", "--temp", "0", "-m", str(tiny_files["tied"])]
    lines = "Hello there\n/system Be brief.\nAnd again\n"
    results = Ranks(["-m", "mlx_llama", *args, "--tensor-parallel"], 2, stdin=lines,
                    env={"MLX_LLAMA_ALL_SUM_ONLY": "1"}).wait(timeout=300)
    alone = subprocess.run([sys.executable, "-m", "mlx_llama", *args], input=lines, capture_output=True, text=True,
                           timeout=300)
    assert results[0][0] == 0 and results[0][1] == alone.stdout and alone.stdout.count(">>>") == 4
    assert results[1] == (0, "", "")


def test_bench_command(tiny_files):
    args = ["bench", "-p", "16", "-n", "4", "-r", "1", "--json", "-m", str(tiny_files["tied"]), "--tensor-parallel"]
    results = Ranks(["-m", "mlx_llama", *args], 2).wait(timeout=300)
    report = json.loads(results[0][1])
    assert [t["test"] for t in report["tests"]] == ["pp16", "tg4"] and all(t["tps_mean"] > 0 for t in report["tests"])
    assert report["model"]["backend"].endswith(" × 2 (tensor parallel, ring)")
    assert results[1] == (0, "", "")


# -- faults: one line on rank 0, never a hang -----------------------------------------------------


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    return lines[0]


def test_gqa_heads_that_do_not_divide_are_one_line(smollm2_path):
    results = Ranks(["-m", "mlx_llama", "generate", "--raw", "Hi", "-n", "4", "--tensor-parallel"], 2).wait(timeout=120)
    assert [rc for rc, _, _ in results] == [2, 2]
    assert "3 key/value heads" in one_error_line(results[0][2])
    assert results[1][1:] == ("", "")


@pytest.mark.parametrize("mode", ["--pipeline", pytest.param("--tensor-parallel", marks=SLOW)])
def test_killing_a_rank_ends_the_run(tiny_files, mode):
    run = Ranks(["-m", "mlx_llama", "generate", "--raw", "Once upon a time", "-n", "2000", "--temp", "0",
                 "-m", str(tiny_files["tied"]), mode], 3)
    run.wait_for_output(0, 40, timeout=120)  # mid-generation
    killed = time.monotonic()
    run.procs[1].send_signal(signal.SIGKILL)
    results = run.wait(timeout=30)  # raises if any rank is still running after 30 s
    assert time.monotonic() - killed < 30
    assert results[0][0] == 2 and "rank 1 stopped" in one_error_line(results[0][2])
    assert results[2][0] != 0 and results[2][2] == ""


def test_launcher_stop_is_one_line(tiny_files):
    """mlx.launch stops the others with SIGTERM when a rank fails: rank 0 says so, even while
    it waits inside MLX."""
    run = Ranks(["-m", "mlx_llama", "generate", "--raw", "Once upon a time", "-n", "2000", "--temp", "0",
                 "-m", str(tiny_files["tied"]), "--pipeline"], 2)
    run.wait_for_output(0, 40, timeout=120)
    run.procs[0].send_signal(signal.SIGTERM)
    results = run.wait(timeout=30)
    assert results[0][0] == 2 and "stopped by the launcher" in one_error_line(results[0][2])


def test_a_rank_that_fails_to_start(tiny_files, tmp_path):
    """Rank 1's file is missing: it says so (marked with its rank), and rank 0 ends the run."""
    (tmp_path / "model.gguf").symlink_to(tiny_files["tied"])  # rank 0 finds it; rank 1 runs elsewhere
    (tmp_path / "elsewhere").mkdir()
    run = Ranks(["-m", "mlx_llama", "generate", "--raw", "Hi", "-n", "4", "--pipeline", "-m", "model.gguf"], 2,
                cwd=[tmp_path, tmp_path / "elsewhere"])
    results = run.wait(timeout=120)
    assert results[0][0] == 2 and "rank 1 stopped" in one_error_line(results[0][2])
    assert results[1][0] == 2 and one_error_line(results[1][2]).startswith(f"{ERROR}rank 1: model.gguf")


def test_a_rank_that_never_comes(tiny_files):
    run = Ranks(["-m", "mlx_llama", "generate", "--raw", "Hi", "-n", "4", "--pipeline", "-m", str(tiny_files["tied"])],
                1, hostfile_ranks=2, env={"MLX_LLAMA_DIST_TIMEOUT": "3"})
    started = time.monotonic()
    (rc, out, err), = run.wait(timeout=60)
    # MLX's ring setup holds Python's lock while it waits: a sentinel process ends the rank (SIGKILL)
    assert rc in (2, -signal.SIGKILL) and "could not connect to the other ranks within 3 s" in one_error_line(err)
    assert time.monotonic() - started < 30


# -- SmolLM2 (slow): the acceptance figures ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode, n", [("pipeline", 2), ("pipeline", 3), ("tensor", 3)])
def test_smollm2_as_one_process(smollm2_path, tmp_path, mode, n):
    """Bit for bit in both modes (tensor parallel with the default "gather"). With "sum" (partial
    products of attn_output and ffn_down added across ranks) 1.09e-4 was measured on 2026-12-02:
    a logit of -24.9 off by 4e-6 of its size, over 30 layers."""
    settings = dict(ctx=512, chunks=4, greedy=48)
    ref = single(smollm2_path, **settings)
    got = worker(smollm2_path, mode, n, tmp_path, "--ctx", "512", "--chunks", "4", "--greedy", "48")
    assert_same_run(got, ref, exact=True)
    assert f"{got['ppl']:.4f}" == f"{ref['ppl']:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_memory_24_layers_few_hundred_mb(tmp_path_factory, tmp_path, mode):
    from check_distributed import make_24_layers

    path = tmp_path_factory.getbasetemp() / "layers24.gguf"
    if not path.exists():
        make_24_layers(path)
    whole = worker(path, "single", 1, tmp_path, "--memory-only")["memory"][0]
    for n in (2, 3):
        shares = [m / whole for m in worker(path, mode, n, tmp_path, "--memory-only")["memory"]]
        assert max(shares) <= 1 / n + 0.05, shares
