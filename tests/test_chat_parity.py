"""Greedy chat answers against llama.cpp's on the same rendered prompts (tests/golden/smollm2_chat.json).

Parity, not a pleasant answer, is the test of correctness: with its template's default system
prompt, SmolLM2-135M Q4_1 answers "What is the capital of France?" with "L'Étoile, la Cité, …"
in llama.cpp, and the first token is a near-tie there.
"""

import json
import os

import pytest

import golden
import mlx_llama
from mlx_llama.chat_template import template_for
from mlx_llama.prompt import chat_messages, encode_prompt
from mlx_llama.generation import GenerationStats, stream_generate

GOLDEN = os.path.join(golden.GOLDEN_DIR, "smollm2_chat.json")


@pytest.fixture(scope="module")
def chat_golden():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


def test_rendered_prompts_are_the_goldens(smollm2, chat_golden):
    _, tokenizer = smollm2
    template = template_for(tokenizer.metadata)
    for e in chat_golden["entries"]:
        rendered = template.render(chat_messages(e["name"]), add_generation_prompt=True)
        assert rendered == e["prompt"]
        assert encode_prompt(tokenizer, e["name"], template).ids == e["prompt_ids"]  # llama.cpp's tokens


def test_greedy_chat_answers_match_llama_cpp(smollm2, chat_golden):
    model, tokenizer = smollm2
    assert len(chat_golden["entries"]) >= 6
    for e in chat_golden["entries"]:
        stats = GenerationStats()
        list(stream_generate(model, tokenizer, e["prompt_ids"], len(e["generated"]), stats=stats, temp=0))
        result = golden.check_greedy(e, stats.sampled)
        print(result)
        assert result.ok, str(result)


def test_france_answer_is_llama_cpps_too(chat_golden):
    """The 'nonsense' answer is the model's, not ours: llama.cpp gives it on the same prompt."""
    france = next(e for e in chat_golden["entries"] if e["name"] == "What is the capital of France?")
    assert france["text"].startswith("L'Étoile")
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in france["prompt"]
    # its first token is a near-tie in llama.cpp ("L" vs "The", 0.09 apart): mlx_llama may take
    # the other branch, "The capital of France is Paris." — within the parity rule
    assert france["gaps"][0] < 0.5
