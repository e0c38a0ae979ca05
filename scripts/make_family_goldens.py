#!/usr/bin/env python3
"""Produce tests/golden/family_templates.json: the chat templates of the model families mlx_llama
runs (Llama-3.1/3.2, Qwen2.5, Qwen3, Phi-3.5, Gemma), rendered by Hugging Face transformers.

The template sources are llama.cpp's copies of the families' own templates (models/templates/ in
the llama-cpp-python 0.3.36 sdist, fetched by tests/resources.py). Each conversation of
`make_template_goldens.CONVERSATIONS` is rendered by transformers' `apply_chat_template` with the
family's special tokens (or the error the template raises: Gemma refuses system messages), and
tokenized by llama.cpp with the family's vocabulary (its vocab test file), special tokens parsed.
A fixed `date_string` keeps the Llama-3 templates' date out of the goldens.

Needs transformers (no torch) and llama_cpp, once:
    /tmp/tfenv/bin/python scripts/make_family_goldens.py     (see make_template_goldens.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from make_template_goldens import CONVERSATIONS, hf_render  # noqa: E402

DATE = "26 Jul 2024"
# family → (llama.cpp's template file, llama.cpp vocab test file or None, special tokens, end of turn)
FAMILIES = {
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama-bpe",
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama-bpe",
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                "<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "qwen2", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", "phi-3",
                {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"},
                "<|end|>"),
    "gemma": ("google-gemma-2-2b-it.jinja", None,
              {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}, "<end_of_turn>"),
}


def main():
    import llama_cpp
    import transformers
    from jinja2 import TemplateError

    from resources import templates_dir, vocab_dir

    cases, families = [], {}
    for family, (file, vocab_name, tokens, eot) in FAMILIES.items():
        source = (templates_dir() / file).read_text(encoding="utf-8")
        families[family] = {"file": file, "vocab": vocab_name, "tokens": tokens, "end_of_turn": eot, "source": source}
        vocab = None
        if vocab_name:
            vocab = llama_cpp.Llama(str(vocab_dir() / f"ggml-vocab-{vocab_name}.gguf"), vocab_only=True, verbose=False)
        for cid, messages, gen in CONVERSATIONS:
            case = {"family": family, "conversation": cid, "add_generation_prompt": gen}
            try:
                case["expected"] = hf_render(source, tokens, messages, gen, date_string=DATE)
            except TemplateError as e:
                case["raises"] = str(e)
            if vocab is not None and "expected" in case:
                case["llama_cpp_tokens"] = vocab.tokenize(case["expected"].encode(), add_bos=False, special=True)
            cases.append(case)
    out = {
        "generator": "scripts/make_family_goldens.py",
        "transformers_version": transformers.__version__,
        "llama_cpp_version": llama_cpp.__version__,
        "date_string": DATE,
        "families": families,
        "conversations": {cid: {"messages": m} for cid, m, _ in CONVERSATIONS},
        "cases": cases,
    }
    path = ROOT / "tests" / "golden" / "family_templates.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}: {len(cases)} cases, {sum('raises' in c for c in cases)} raising")


if __name__ == "__main__":
    main()
