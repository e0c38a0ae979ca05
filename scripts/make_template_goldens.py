#!/usr/bin/env python3
"""Produce tests/golden/chat_templates.json: chat templates rendered by Hugging Face transformers.

For every template (SmolLM2's own, read from the default model's GGUF metadata, and the
built-ins of `mlx_llama.chat_template`: chatml, llama-2, llama-3, zephyr) and every conversation
in CONVERSATIONS, stores transformers' `apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)` output. The tokenizer given to transformers is a stub that carries
only the template's special tokens (bos/eos/unk/pad as in the model's tokenizer_config.json), so
what is compared is the template rendering alone. For SmolLM2 it also stores llama.cpp's tokens of
each rendering (`Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)`) when
llama_cpp is importable.

Before writing, the built-in sources are checked against the upstream tokenizer_config.json
texts transcribed below in their JSON form (so the Python escaping of `'\\n'` in llama-2 is
checked against an independent copy).

Needs transformers (no torch): run it once from an environment that has it, e.g.
    python3 -m venv --system-site-packages /tmp/tfenv && /tmp/tfenv/bin/pip install transformers
    /tmp/tfenv/bin/python scripts/make_template_goldens.py [--model PATH] [--out tests/golden/chat_templates.json]
The tests do not need transformers. The output is deterministic (sorted keys, fixed order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Upstream sources, exactly as the JSON string values in each tokenizer_config.json.
UPSTREAM_JSON = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama-2": r'''"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"''',
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "zephyr": r'''"{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"''',
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama-3": r'''"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"''',
    # transformers' former default (ChatML) template
    "chatml": r'''"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"''',
}

# Special tokens each model family's tokenizer_config.json gives its template.
BUILTIN_TOKENS = {
    "llama-2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
}


def S(c):
    return {"role": "system", "content": c}


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


# (id, messages, add_generation_prompt). All alternate user/assistant after an optional system
# message, so that llama-2's template accepts them.
CONVERSATIONS = [
    ("user_only", [U("What is the capital of France?")], True),
    ("user_only_nogen", [U("What is the capital of France?")], False),
    ("system_user", [S("You are a terse assistant."), U("Name three primes.")], True),
    ("multi_turn", [S("You are a helpful assistant."), U("Hi!"), A("Hello! How can I help?"),
                    U("Tell me a joke.")], True),
    ("multi_turn_nogen", [S("You are a helpful assistant."), U("Hi!"), A("Hello! How can I help?"),
                          U("Tell me a joke.")], False),
    ("empty_system", [S(""), U("Say hi.")], True),
    ("no_system_multi", [U("2+2?"), A("4"), U("And 3+3?"), A("6"), U("And 4+4?")], True),
    ("ends_with_assistant", [U("Ping"), A("Pong")], False),
    ("ends_with_assistant_gen", [S("Be brief."), U("Ping"), A("Pong")], True),
    ("whitespace_unicode", [U("  Héllo wörld 🙂\n\nline two\t "), A(" ¡Hola! 日本語 "),
                            U("\nnaïve café\n")], True),
    ("code", [S("You write Python."), U("def f(x):\n    return x**2\n\nExplain f."),
              A("f squares its argument:\n\n```python\nf(3)  # 9\n```")], False),
    ("markers_in_content", [U("What does <|im_end|> or </s> or [INST] mean?")], True),
    ("long", [S("You are SmolLM."), U("One"), A("Two"), U("Three"), A("Four"), U("Five"), A("Six"),
              U("Seven")], True),
]


def default_model() -> Path:
    from mlx_llama import default_model as path

    return Path(path())


def hf_render(source: str, tokens: dict, messages, add_generation_prompt: bool, **kwargs) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    stub = Tokenizer(WordLevel({"<stub-unk>": 0}, unk_token="<stub-unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=stub, chat_template=source, **tokens)
    assert tok.special_tokens_map == tokens, (tok.special_tokens_map, tokens)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="SmolLM2 GGUF (default: the package's model)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "chat_templates.json")
    args = ap.parse_args()

    import transformers

    from mlx_llama.chat_template import BUILTIN_TEMPLATES, special_tokens
    from mlx_llama.gguf_file import GGUFFile

    for name, text in UPSTREAM_JSON.items():
        if json.loads(text) != BUILTIN_TEMPLATES[name]:
            raise SystemExit(f"built-in template {name!r} differs from its upstream source")

    model = args.model or default_model()
    md = GGUFFile(str(model)).metadata
    templates = {"smollm2": {"source": md["tokenizer.chat_template"], "tokens": special_tokens(md)}}
    for name in sorted(BUILTIN_TEMPLATES):
        templates[name] = {"source": BUILTIN_TEMPLATES[name], "tokens": BUILTIN_TOKENS[name]}

    try:
        import llama_cpp

        vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
        llama_cpp_version = llama_cpp.__version__
    except ImportError:
        vocab, llama_cpp_version = None, None

    cases = []
    for tname, t in templates.items():
        for cid, messages, gen in CONVERSATIONS:
            text = hf_render(t["source"], t["tokens"], messages, gen)
            case = {"template": tname, "conversation": cid, "add_generation_prompt": gen, "expected": text}
            if tname == "smollm2" and vocab is not None:
                case["llama_cpp_tokens"] = vocab.tokenize(text.encode(), add_bos=False, special=True)
            cases.append(case)

    out = {
        "generator": "scripts/make_template_goldens.py",
        "transformers_version": transformers.__version__,
        "llama_cpp_version": llama_cpp_version,
        "model": model.name,
        "templates": templates,
        "conversations": {cid: {"messages": m} for cid, m, _ in CONVERSATIONS},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(cases)} renderings ({len(templates)} templates x {len(CONVERSATIONS)} "
          f"conversations), transformers {transformers.__version__}, llama_cpp {llama_cpp_version}")


if __name__ == "__main__":
    main()
