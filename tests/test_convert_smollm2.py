"""Round trips of a real model (SmolLM2-135M-Instruct Q4_1, the default) through the other tools,
the issue's acceptance figures (`slow`: python -m pytest -m slow tests/test_convert_smollm2.py -s):

* its mlx-lm directory: mlx-lm's greedy tokens are mlx_llama's on the GGUF file, mlx_lm.server
  answers a chat request, and mlx_llama loads the directory faster than the file;
* a model mlx-lm quantized itself (4-bit, groups of 32) → GGUF Q4_1 → mlx-lm directory: the same
  arrays bit for bit, and llama.cpp running the GGUF picks mlx-lm's top token on botchan.txt.
"""

import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from test_convert import assert_same_greedy, greedy, run_mlx_lm
from test_convert_cli import mlx_lm_server_answer

import mlx_llama
from mlx_llama.convert import gguf_to_mlx, to_gguf

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smol_dir(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "SmolLM2-mlx"
    # float32: MLX's CPU backend computes float16 ~10× slower; the quantized weights are the same
    gguf_to_mlx(smollm2_path, out, dtype="float32")
    return out


def test_mlx_lm_generates_mlx_llama_tokens(smollm2_path, smol_dir, tmp_path, capsys):
    _, tokenizer = mlx_llama.load(smollm2_path)
    prompts = [tokenizer.encode(p, add_special=True) for p in PROMPTS]
    theirs = run_mlx_lm([{"dir": smol_dir, "prompt": p, "max_tokens": 32} for p in prompts], tmp_path)
    for i, prompt in enumerate(prompts):
        ours, gaps = greedy(smollm2_path, prompt, 32)
        generated = [int(t) for t in theirs[f"generated_{i}"]]
        with capsys.disabled():
            same = next((j for j, (a, b) in enumerate(zip(ours, generated)) if a != b), min(len(ours), len(generated)))
            print(f"\n{PROMPTS[i]!r}: mlx-lm {len(generated)} tokens, mlx_llama {len(ours)}, equal for the first {same}"
                  f"{'' if same == len(ours) == len(generated) else f' (top-2 gap there {gaps[same]:.3f})'}")
        assert len(ours) >= 16 and len(generated) >= 16
        assert_same_greedy(ours, gaps, generated, tolerance=0.1)


def test_mlx_lm_server_answers_on_the_directory(smollm2_path, smol_dir):
    model, tokenizer = mlx_llama.load(smollm2_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = mlx_lm_server_answer(smol_dir, messages, 12)
    assert answer == mlx_llama.generate(model, tokenizer, messages, 12, temp=0) and "Paris" in answer


def load_seconds(path, **kw) -> float:
    start = time.perf_counter()
    model, _ = mlx_llama.load(path, **kw)
    mx.eval(model.parameters())
    return time.perf_counter() - start


@pytest.mark.parametrize("cpu_dequantize", [None, False])
def test_directory_loads_faster_than_the_gguf_file(smollm2_path, tmp_path, cpu_dequantize, capsys):
    """The default float16 directory against the file, loads taken in turn (the same machine load
    for both), the file pages cached; None: the CPU rule (dequantized for a model this small)."""
    gguf_to_mlx(smollm2_path, tmp_path / "f16")
    times = {smollm2_path: [], tmp_path / "f16": []}
    for _ in range(4):
        for path, seconds in times.items():
            seconds.append(load_seconds(path, cpu_dequantize=cpu_dequantize))
    gguf, directory = (min(t[1:]) for t in times.values())  # the first of each: a warm-up
    with capsys.disabled():
        print(f"\nmlx_llama.load, weights {'quantized' if cpu_dequantize is False else 'dequantized (CPU rule)'}: "
              f"GGUF file {gguf:.3f} s, mlx-lm directory {directory:.3f} s (best of 3)")
    assert directory < gguf


@pytest.fixture(scope="module")
def mlx_4bit(smol_dir, tmp_path_factory):
    """SmolLM2 as mlx-lm quantizes a model: dequantized, then 4-bit groups of 32 with float16
    scales, mlx-lm's default (mlx_lm.convert)."""
    pytest.importorskip("mlx_lm", reason="mlx-lm quantizes the model (pip install mlx-lm)")
    root = tmp_path_factory.mktemp("mlx_4bit")
    for args in (["--hf-path", smol_dir, "--mlx-path", root / "f16", "-d"],
                 ["--hf-path", root / "f16", "--mlx-path", root / "q4", "-q", "--q-bits", "4", "--q-group-size", "32",
                  "--dtype", "float16"]):
        r = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", *map(str, args)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return root / "q4"


def test_mlx_4bit_to_q4_1_and_back_is_bit_identical(mlx_4bit, tmp_path, capsys):
    reports = to_gguf(mlx_4bit, tmp_path / "q4_1.gguf")
    assert {(r.source, r.target) for r in reports if r.source.startswith("affine")} == {("affine 4-bit, group 32", "Q4_1")}
    assert all(r.max_error == 0 for r in reports), reports
    gguf_to_mlx(tmp_path / "q4_1.gguf", tmp_path / "back")
    original, back = mx.load(str(mlx_4bit / "model.safetensors")), mx.load(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys()
    for name, a in original.items():
        assert back[name].dtype == a.dtype, name
        np.testing.assert_array_equal(np.array(back[name].view(mx.uint16) if a.dtype == mx.float16 else back[name]),
                                      np.array(a.view(mx.uint16) if a.dtype == mx.float16 else a), err_msg=name)
    with capsys.disabled():
        print(f"\nmlx-lm 4-bit g32 → Q4_1 → mlx-lm: {len(original)} arrays bit-identical")


def test_llama_cpp_runs_the_q4_1_file_as_mlx_lm_runs_the_directory(mlx_4bit, tmp_path, capsys):
    from resources import botchan
    from test_convert_hf import kl, llama_cpp_run

    to_gguf(mlx_4bit, tmp_path / "q4_1.gguf")
    _, tokenizer = mlx_llama.load(tmp_path / "q4_1.gguf")
    ids = tokenizer.encode(botchan().read_text(encoding="utf-8")[:4000], add_special=True)[:256]
    theirs, _ = llama_cpp_run(tmp_path / "q4_1.gguf", ids)
    mlx_lm = run_mlx_lm([{"dir": mlx_4bit, "tokens": ids, "float32": True}], tmp_path)["logits_0"]  # exact cast
    agreement = float(np.mean(theirs.argmax(-1) == mlx_lm.argmax(-1)))
    with capsys.disabled():
        print(f"\nQ4_1 from mlx-lm 4-bit g32, {len(ids)} tokens of botchan.txt: llama.cpp vs mlx-lm top-1 "
              f"{agreement:.1%}, KL(mlx-lm ‖ llama.cpp) {kl(mlx_lm, theirs):.4f}")
    assert agreement >= 0.95
