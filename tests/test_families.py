"""The chat templates and tokenizers of the families people download — Llama-3.1/3.2, Qwen2.5,
Qwen3, Phi-3.5, Gemma — through mlx_llama's template renderer and exact tokenizer:
renderings equal transformers' (`tests/golden/family_templates.json`, made by
`scripts/make_family_goldens.py`), their tokens equal llama.cpp's with the family's vocabulary,
and the template's end-of-turn token stops generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlx_llama.chat_template import ChatTemplate, TemplateRaisedError, stop_token_ids
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.tokenizer import Tokenizer
from test_tokenizer import vocab_path

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "family_templates.json")
with open(GOLDEN, encoding="utf-8") as _fh:
    G = json.load(_fh)
CASES = G["cases"]
FAMILIES = G["families"]
_tokenizers: dict = {}


def template(family: str) -> ChatTemplate:
    f = FAMILIES[family]
    return ChatTemplate(f["source"], f["tokens"], name=family)


def tokenizer(vocab: str) -> Tokenizer:
    if vocab not in _tokenizers:
        _tokenizers[vocab] = Tokenizer.from_gguf(GGUFFile(vocab_path(vocab)))
    return _tokenizers[vocab]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['family']}-{c['conversation']}" for c in CASES])
def test_rendering_equals_transformers_and_tokens_llama_cpp(case):
    tmpl = template(case["family"])
    messages = G["conversations"][case["conversation"]]["messages"]
    if "raises" in case:
        with pytest.raises(TemplateRaisedError) as e:
            tmpl.render(messages, case["add_generation_prompt"], date_string=G["date_string"])
        assert e.value.message == case["raises"]
        return
    text = tmpl.render(messages, case["add_generation_prompt"], date_string=G["date_string"])
    assert text == case["expected"]
    vocab = FAMILIES[case["family"]]["vocab"]
    if vocab:
        assert tokenizer(vocab).encode(text, add_special=False, parse_special=True) == case["llama_cpp_tokens"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f]["vocab"]])
def test_end_of_turn_is_found_and_is_a_stop_token(family):
    tmpl, tok = template(family), tokenizer(FAMILIES[family]["vocab"])
    eot = FAMILIES[family]["end_of_turn"]
    assert eot in tmpl.end_of_turn
    (eot_id,) = tok.encode(eot, add_special=False, parse_special=True)
    assert eot_id in tok.stop_ids | stop_token_ids(tmpl, tok)


@pytest.mark.parametrize("family, arch", [("llama-3.1", "llama"), ("qwen2.5", "qwen2"), ("qwen3", "qwen3"),
                                          ("phi-3.5", "phi3")])
def test_generation_stops_at_the_end_of_turn(family, arch, tiny_gguf):
    """A tiny model of the family's architecture with its vocabulary and template, pushed (by a
    logit bias) to emit the end-of-turn token first: the answer is empty and finishes 'stop'."""
    f = FAMILIES[family]
    path = tiny_gguf("F32", arch=arch, vocab_from=vocab_path(f["vocab"]),
                     extra_metadata={"tokenizer.chat_template": f["source"]})
    (eot_id,) = tokenizer(f["vocab"]).encode(f["end_of_turn"], add_special=False, parse_special=True)
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", str(path), "Hello", "-n", "8",
                        "--temp", "0", "-l", f"{eot_id}+100", "-v"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "chat template: gguf" in r.stderr and "finish: stop" in r.stderr and "generation: 0 tokens" in r.stderr
    assert r.stdout == "\n"
