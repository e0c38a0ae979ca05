"""`mlx_llama info` and `mlx_llama perplexity` on the real default model."""

import json
import math
import re
import subprocess
import sys

import numpy as np

import golden


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=600)


def test_info(smollm2_path):
    r = run_cli("info", str(smollm2_path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["architecture"] == "llama" and report["tensors"] == 272
    assert report["parameters"] == 134_515_008  # 49152·576 + 30 layers · (2·576² + 2·576·192 + 3·576·1536 + 2·576) + 576
    assert report["types"]["Q4_1"]["tensors"] == 210 and report["types"]["Q8_0"]["tensors"] == 1
    assert report["types"]["Q4_1"]["mlx"].startswith("affine 4-bit, group 32")
    assert report["tokenizer"]["model"] == "gpt2" and report["tokenizer"]["pre"] == "smollm"
    assert report["chat_template"] is True and report["context_length"] == 8192
    text = run_cli("info", str(smollm2_path), "--metadata").stdout
    assert "tokenizer.ggml.tokens = [49152 items" in text and "Q8_0" in text


def reference_perplexity(oracle, tokens, ctx, chunks):
    """llama.cpp's method, written out on the float64 oracle (no BOS: SmolLM2 does not add one)."""
    nll = []
    for i in range(chunks):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        logits = oracle.logits(chunk)
        first = ctx // 2
        for j in range(first, ctx - 1):
            row = logits[j]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            nll.append(lse - row[chunk[j + 1]])
    return math.exp(np.mean(nll))


def test_perplexity_matches_oracle(smollm2_path, reference, tmp_path):
    g = golden.load_teacher_forced()
    text_file = tmp_path / "text.txt"
    text_file.write_text(g.meta["text"], encoding="utf-8")
    r = run_cli("perplexity", "-m", str(smollm2_path), "-f", str(text_file), "--ctx", "128", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    assert re.match(r"\[1\][\d.]+,\[2\][\d.]+,", r.stdout)
    ours = float(re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", r.stdout).group(1))
    expected = reference_perplexity(reference(smollm2_path), g.tokens.tolist(), 128, 2)
    assert abs(ours / expected - 1) < 0.002, (ours, expected)


def test_perplexity_needs_enough_text(smollm2_path, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    r = run_cli("perplexity", "-m", str(smollm2_path), "-f", str(short))
    assert r.returncode == 2 and "needs at least 1024" in r.stderr and "Traceback" not in r.stderr
