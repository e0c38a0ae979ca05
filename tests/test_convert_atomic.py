"""Conversion is atomic: killed at any point it leaves the old complete output or the new one;
a damaged model directory loads as one error line. (--force and Ctrl-C: test_convert_cli.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from mlx_llama.errors import MlxLlamaError

ROOT = Path(__file__).resolve().parent.parent
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
CONVERT = str(ROOT / "convert" / "gguf_to_mlx.py")
TOKENS = mx.array([list(range(5, 37))])
DELAYS = (1.0, 2.0, 3.0)  # seconds after its start a conversion is killed

# Runs the converter with a file-size limit: the kernel kills it (SIGXFSZ, which Python ignores
# unless told otherwise) at the write that takes any one file past N bytes.
KILLED_AT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
n, sys.argv = int(sys.argv[1]), sys.argv[2:]  # python -c KILLED_AT N convert.py ARGS...
resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(*args, limit: int | None = None, timeout=300):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no .pyc writes under the file-size limit
    cmd = [sys.executable, CONVERT, *map(str, args)]
    if limit is not None:
        cmd = [sys.executable, "-c", KILLED_AT, str(limit), CONVERT, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def logits(path) -> np.ndarray:
    model, _ = mlx_llama.load(path)
    return np.array(model(TOKENS))


@pytest.fixture(scope="module")
def sources(tiny_gguf, tmp_path_factory):
    """Two different models of one shape, and the logits of each converted once: the old
    output's and the new one's."""
    # narrow (hidden 32): the weights are smaller than the vocabulary, so kills land in both files
    shape = dict(hidden=32, n_heads=2, n_kv_heads=1, ffn=64)
    a, b = tiny_gguf({"default": "Q4_1"}, seed=1, **shape), tiny_gguf({"default": "Q4_1"}, seed=2, **shape)
    ref = tmp_path_factory.mktemp("reference")
    for src, name in ((a, "a"), (b, "b")):
        assert convert(src, ref / name, "--dtype", "float32").returncode == 0
    return a, b, logits(ref / "a"), logits(ref / "b")


def test_a_kill_at_any_byte_count_leaves_old_or_new(sources, tmp_path, capsys):
    a, b, la, lb = sources
    out = tmp_path / "out"
    assert convert(a, out, "--dtype", "float32").returncode == 0
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    largest = max(sizes.values())
    # a limit kills the converter at the write that takes any one file past it: in whichever
    # file reaches it first (not below 32 bytes: a library writes a 32-byte semaphore file at import)
    limits = [100, 4096, largest // 4, largest // 2, largest - 1]
    for n in limits:
        r = convert(b, out, "--dtype", "float32", "--force", limit=n)
        assert r.returncode == -signal.SIGXFSZ, (n, r.returncode, r.stderr[-2000:])
        assert {p.name: p.stat().st_size for p in out.iterdir()} == sizes, n
        np.testing.assert_array_equal(logits(out), la)  # the old output, whole
        assert all(p.name == "out" or p.name.startswith(".") for p in tmp_path.iterdir())  # a partial stays hidden
    # killed at moments instead of byte counts (the swap itself included), converting each time
    # the model that is not the one in place
    outcomes, current, other = [], (a, la), (b, lb)
    for delay in DELAYS:
        p = subprocess.Popen([sys.executable, CONVERT, str(other[0]), str(out), "--dtype", "float32", "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()
        got = logits(out)
        if np.array_equal(got, current[1]):
            outcomes.append("old")
        else:
            np.testing.assert_array_equal(got, other[1])  # else a mix of the two
            outcomes.append("new")
            current, other = other, current
    report = f"conversion killed at {len(limits)} byte counts ({', '.join(map(str, limits))}): old output intact each " \
             f"time; killed after {', '.join(map(str, DELAYS))} s: {', '.join(outcomes)}"
    with capsys.disabled():
        print(f"\n  {report}", end="")


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "config not JSON", "config a list",
                                    "quantization a list", "unknown architecture", "no tokenizer", "weights of another shape"])
def test_a_damaged_directory_is_one_error(sources, tiny_gguf, tmp_path, damage):
    out = tmp_path / "out"
    assert convert(sources[0], out, "--dtype", "float32").returncode == 0
    config = json.loads((out / CONFIG).read_text())
    weights = out / WEIGHTS
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no weights":
        weights.unlink()
    elif damage == "config not JSON":
        (out / CONFIG).write_text('{"dtype": ')
    elif damage == "config a list":
        (out / CONFIG).write_text("[]")
    elif damage == "quantization a list":
        (out / CONFIG).write_text(json.dumps({**config, "quantization": [1, 2]}))
    elif damage == "unknown architecture":
        (out / CONFIG).write_text(json.dumps({**config, "model_type": "mamba"}))
    elif damage == "no tokenizer":
        (out / TOKENIZER).unlink()
    else:  # the weights of a 3-layer model under the 2-layer config
        other = tmp_path / "other"
        assert convert(tiny_gguf({"default": "Q4_1"}, n_layers=3), other, "--dtype", "float32").returncode == 0
        weights.write_bytes((other / WEIGHTS).read_bytes())
    with pytest.raises(MlxLlamaError) as e:
        mlx_llama.load(out)
    assert str(e.value).startswith(str(out)) and "\n" not in str(e.value), str(e.value)
