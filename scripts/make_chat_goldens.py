"""Golden greedy chat answers from llama.cpp, on prompts rendered by the model's own template.

Each question becomes a one-turn conversation (no system message, so SmolLM2's template adds
its default one), rendered by `mlx_llama.chat_template` — the renderer the tests check against
transformers — then tokenized and answered greedily (48 tokens) by llama.cpp. The tests feed
the same rendered prompt to mlx_llama and compare, a divergence accepted only where llama.cpp's
top-2 logits differ by < 0.5 at that step.

    python scripts/make_chat_goldens.py      # writes tests/golden/smollm2_chat.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_goldens import default_model_path, dump_json, greedy, make_llama, sha256_file  # noqa: E402

from mlx_llama.prompt import chat_messages  # noqa: E402
from mlx_llama.chat_template import template_for  # noqa: E402
from mlx_llama.gguf_file import GGUFFile  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "How many legs does a spider have?",
    "Give me three tips for staying healthy.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
]
N_GEN = 48
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden", "smollm2_chat.json")


def main() -> None:
    import llama_cpp

    model = default_model_path()
    template = template_for(GGUFFile(model).metadata)
    llm = make_llama(model, False)
    eog = lambda t: llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), t)  # noqa: E731
    entries = []
    for question in QUESTIONS:
        rendered = template.render(chat_messages(question), add_generation_prompt=True)
        ids = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        out = greedy(llm, ids, N_GEN, eog)
        text = llm.detokenize(out["generated"]).decode("utf-8", "replace")
        entries.append(dict(name=question, prompt=rendered, prompt_ids=ids, text=text, **out))
        print(f"{question!r} -> {text!r}  (min gap {min(out['gaps']):.3f})")
    meta = dict(llama_cpp_version=llama_cpp.__version__, model_file=os.path.basename(model), model_sha256=sha256_file(model),
                generator="scripts/make_chat_goldens.py", max_new_tokens=N_GEN,
                description="llama.cpp greedy answers to one-turn chats rendered by the GGUF's own template (default system prompt)")
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(dump_json(dict(meta=meta, entries=entries)))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
