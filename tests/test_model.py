"""The MLX model against the float64 NumPy oracle (exact) and against llama.cpp (statistical)."""

import mlx.core as mx
import numpy as np
import pytest

import golden
import mlx_llama
from mlx_llama.generation import generate_tokens
from mlx_llama.sample import SamplingParams

TEXT_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 9842, 2402, 253, 655, 28, 281, 253]


def mlx_logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([list(tokens)]))[0].astype(mx.float32))


def mlx_greedy(model, prompt, n) -> list[int]:
    return list(generate_tokens(model, list(prompt), SamplingParams(temp=0), n))


@pytest.mark.parametrize(
    "tensor_type, tied",
    [("F32", True), ("F16", False), ("BF16", True), ("Q4_0", False), ("Q4_1", True), ("Q8_0", False),
     ({"default": "Q4_1", "token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "F16", "blk.1.attn_v.weight": "Q4_0"}, True)],
    ids=["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "mixed"],
)
@pytest.mark.parametrize("cpu_dequantize", [True, False], ids=["dequantized", "quantized"])
def test_fixture_matches_oracle(tiny_gguf, reference, tensor_type, tied, cpu_dequantize):
    path = tiny_gguf(tensor_type, tied=tied)
    model, _ = mlx_llama.load(path, dtype=mx.float32, cpu_dequantize=cpu_dequantize)
    tokens = list(range(3, 3 + 40 * 7, 7))
    ours, ref = mlx_logits(model, tokens), reference(path).logits(tokens)
    assert np.abs(ours - ref).max() <= 1e-3


def test_kv_cache_matches_full_pass(tiny_gguf):
    model, _ = mlx_llama.load(tiny_gguf("Q8_0"), dtype=mx.float32)
    tokens = list(range(10, 310))  # > one cache step (256), written in uneven chunks
    full = mlx_logits(model, tokens)
    cache, parts = model.make_cache(), []
    for chunk in (tokens[:5], tokens[5:6], tokens[6:250], tokens[250:251], tokens[251:]):
        parts.append(np.array(model(mx.array([chunk]), cache)[0]))
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-4)
    assert cache[0].offset == len(tokens)


@pytest.mark.parametrize("cpu_dequantize", [True, False], ids=["dequantized", "quantized"])
def test_smollm2_matches_oracle(smollm2, smollm2_path, reference, cpu_dequantize):
    model = smollm2[0] if cpu_dequantize else mlx_llama.load(smollm2_path, dtype=mx.float32, cpu_dequantize=False)[0]
    ours, ref = mlx_logits(model, TEXT_IDS[:12]), reference(smollm2_path).logits(TEXT_IDS[:12])
    assert np.abs(ours - ref).max() <= 1e-3


def check_greedy_against_oracle(smollm2, oracle, prompts: int, n: int):
    """n greedy tokens from each golden prompt equal the oracle's, unless the oracle's top-2 tie."""
    model, _ = smollm2
    for entry in golden.load_greedy().entries[:prompts]:
        ours = mlx_greedy(model, entry["prompt_ids"], n)
        ref, gaps = oracle.greedy(entry["prompt_ids"], n)
        diverged = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        assert diverged is None or gaps[diverged] < 1e-3, (entry["name"], diverged, gaps[diverged])


@pytest.mark.slow  # the logits tests above check the same exactness position by position
def test_smollm2_greedy_matches_oracle(smollm2, smollm2_path, reference):
    check_greedy_against_oracle(smollm2, reference(smollm2_path), prompts=2, n=16)


@pytest.mark.slow
def test_smollm2_greedy_matches_oracle_long(smollm2, smollm2_path, reference):
    check_greedy_against_oracle(smollm2, reference(smollm2_path), prompts=5, n=48)


def test_smollm2_teacher_forced_vs_llama_cpp(smollm2):
    """512 tokens of botchan.txt: top-1 agreement ≥ 95% and mean KL(llama.cpp ‖ ours) ≤ 0.005."""
    model, _ = smollm2
    g = golden.load_teacher_forced()
    r = golden.compare_logits(g, mlx_logits(model, g.tokens.tolist()))
    print(f"top-1 agreement {r['top1_agreement']:.4f}, mean KL {r['mean_kl']:.5f}")
    assert r["top1_agreement"] >= 0.95
    assert r["mean_kl"] <= 0.005


def test_smollm2_greedy_vs_llama_cpp(smollm2):
    """Divergence from llama.cpp's greedy tokens only where its top-2 logits are within 0.5."""
    model, tokenizer = smollm2
    gg = golden.load_greedy()
    for entry in gg.entries:
        ours = mlx_greedy(model, entry["prompt_ids"], len(entry["generated"]))
        result = golden.check_greedy(entry, ours)
        print(result)
        assert result.ok, str(result)


def test_cpu_modes_agree(smollm2, smollm2_path):
    """CPU mode (weights expanded to float32 at load, BLAS matmuls) = quantized kernels, to float32 accuracy."""
    dense = smollm2[0]
    quantized, _ = mlx_llama.load(smollm2_path, cpu_dequantize=False)
    assert dense.cpu_dequantized and not quantized.cpu_dequantized
    a, b = mlx_logits(dense, TEXT_IDS), mlx_logits(quantized, TEXT_IDS)
    assert np.abs(a - b).max() <= 1e-3
