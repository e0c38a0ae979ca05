"""Hugging Face checkpoint → GGUF (`mlx_llama convert hf-to-gguf`), against transformers itself.

The checkpoints are tiny random ones of every architecture, made by transformers with trained
tokenizers (`hf_models.py`, run in its own process: torch stays out of this one), with
transformers' logits over the first 256 tokens of botchan.txt. The GGUF files must tokenize as
transformers does (llama.cpp and mlx_llama), and give transformers' logits: F16 in llama.cpp
within 1e-2, in mlx_llama within 1e-3 of transformers run on the same float16-rounded weights;
Q8_0 and Q4_0 as close as their quantization allows (top-1 agreement and KL printed).
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from mlx_llama.convert import to_gguf
from mlx_llama.gguf_file import GGUFFile

# torch and transformers make the checkpoints (~1 minute, and not in the [test] extra): slow
pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
MODELS = ["llama-spm", "llama-bpe", "qwen2", "qwen3", "phi-mini", "gemma3"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    for package in ("torch", "transformers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} makes the reference checkpoints (pip install torch==2.13.0 transformers)")
    from resources import botchan

    out = tmp_path_factory.mktemp("hf_models")
    r = subprocess.run([sys.executable, str(TESTS / "hf_models.py"), str(out), str(botchan())],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def reference(hf_models, name):
    z = np.load(hf_models / f"{name}.npz")
    return [int(i) for i in z["ids"]], z["logits"], z["logits_f16"]


def llama_cpp_run(path, ids):
    """llama.cpp's logits for `ids` (teacher-forced) and its tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is the reference implementation")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), llm


def mlx_llama_logits(path, ids):
    model, tokenizer = mlx_llama.load(path, cpu_dequantize=True)  # weights as gguf computes them, float32
    return np.array(model(mx.array([ids])))[0], tokenizer


def kl(p_logits, q_logits) -> float:
    """Mean KL(p ‖ q) over positions, of the softmaxes of two logit arrays (T, vocab)."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("name", MODELS)
def test_f16_gguf_gives_transformers_logits(hf_models, name, tmp_path, capsys):
    from resources import botchan

    ids, logits, logits_f16 = reference(hf_models, name)
    out = tmp_path / f"{name}.gguf"
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "convert", "hf-to-gguf", str(hf_models / name), str(out),
                        "--outtype", "f16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^float32\s+F16\s+\d+\s", r.stdout, re.MULTILINE) and "wrote" in r.stdout  # the report table

    ours, tokenizer = mlx_llama_logits(out, ids)
    theirs, llm = llama_cpp_run(out, ids)
    text = botchan().read_text(encoding="utf-8")[:4000]
    assert tokenizer.encode(text, add_special=True)[:256] == ids  # transformers' tokens
    assert llm.tokenize(text.encode(), add_bos=True, special=False)[:256] == ids
    llama_cpp_error, ours_error = np.abs(theirs - logits_f16).max(), np.abs(ours - logits_f16).max()
    with capsys.disabled():
        print(f"\n{name} F16: max |Δ| vs transformers (float16 weights): llama.cpp {llama_cpp_error:.2e}, "
              f"mlx_llama {ours_error:.2e}; vs the float32 checkpoint: llama.cpp {np.abs(theirs - logits).max():.2e}")
    assert llama_cpp_error <= 1e-2
    assert ours_error <= 1e-3


def test_tokenizer_and_chat_template_carried_over(hf_models, tmp_path):
    import json

    to_gguf(hf_models / "llama-bpe", tmp_path / "bpe.gguf")
    md = GGUFFile(tmp_path / "bpe.gguf").metadata
    config = json.loads((hf_models / "llama-bpe" / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (hf_models / "llama-bpe" / "chat_template.jinja").read_text()
    assert md["tokenizer.chat_template"] == template
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert md["tokenizer.ggml.tokens"][md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"

    to_gguf(hf_models / "llama-spm", tmp_path / "spm.gguf")
    md = GGUFFile(tmp_path / "spm.gguf").metadata
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_bos_token"] is True
    # padded to the model's 816 rows as llama.cpp's converter pads: unused [PAD] tokens
    assert len(md["tokenizer.ggml.tokens"]) == 816 and md["tokenizer.ggml.tokens"][-1] == "[PAD815]"
    assert md["tokenizer.ggml.token_type"][-1] == 5


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_q8_0_and_q4_0_agree_with_transformers(hf_models, name, tmp_path, capsys):
    ids, logits, _ = reference(hf_models, name)
    figures = {}
    for outtype in ("q8_0", "q4_0"):
        reports = to_gguf(hf_models / name, tmp_path / f"{outtype}.gguf", outtype=outtype)
        assert {r.target for r in reports if r.source == "float32"} >= {outtype.upper()}
        theirs, _ = llama_cpp_run(tmp_path / f"{outtype}.gguf", ids)
        figures[outtype] = (float(np.mean(theirs.argmax(-1) == logits.argmax(-1))), kl(logits, theirs))
    with capsys.disabled():
        print(f"\n{name}, llama.cpp vs transformers over {len(ids)} tokens: " + ", ".join(
            f"{t.upper()} top-1 {a:.1%} KL {k:.4f}" for t, (a, k) in figures.items()))
    assert figures["q8_0"][0] >= 0.98
    # 4-bit: coarser than Q8_0 by an order of magnitude in KL, still mostly the same top token
    assert figures["q4_0"][1] > 10 * figures["q8_0"][1] and figures["q4_0"][0] >= 0.7
