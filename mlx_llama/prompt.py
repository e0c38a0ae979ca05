"""One way to turn a request into tokens: raw text, or messages in a chat template.

The CLI (`generate`, `chat`), `ChatSession`, `stream_generate` and the scripts all go through
`encode_prompt`, so a prompt is tokenized the same way wherever it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .chat_template import ChatTemplate, encode_chat, stop_token_ids, template_for
from .errors import MlxLlamaError

Messages = Sequence[dict]


@dataclass
class Prompt:
    ids: list[int]
    stop_ids: set[int]  # end-of-generation tokens: the vocabulary's, plus the template's end of turn
    template: ChatTemplate | None  # the template applied, None for a raw prompt


def chat_messages(prompt: str | Messages, system: str | None = None) -> list[dict]:
    """`prompt` as a message list (a text becomes one user message), `system` in front if given."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def file_template(tokenizer, name: str | None = None) -> ChatTemplate | None:
    """The template a model file asks for (or the named one), None when the file has none."""
    if name is None and not tokenizer.metadata.get("tokenizer.chat_template"):
        return None
    return template_for(tokenizer.metadata, name)


def encode_prompt(tokenizer, prompt: str | list[int] | Messages, template: ChatTemplate | None = None,
                  system: str | None = None) -> Prompt:
    """The token ids to prefill and the tokens that end the answer.

    template None: `prompt` is raw text, tokenized as llama.cpp's completion mode does (BOS as
    the file asks, special tokens such as `<|im_start|>` parsed), or token ids taken as they are.
    Otherwise `prompt` (a text: one user message; or a list of {"role", "content"} messages) is
    rendered once by the template with the assistant's turn opened, and tokenized as llama.cpp's
    chat mode does; `system` adds a system message in front.
    """
    if template is None:
        if system is not None:
            raise MlxLlamaError("a system message needs a chat template; a raw prompt cannot take one")
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special=True, parse_special=True)
        elif all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise MlxLlamaError("chat messages need a chat template (the model file has none)")
        return Prompt(ids, set(tokenizer.stop_ids), None)
    text = template.render(chat_messages(prompt, system), add_generation_prompt=True)
    return Prompt(encode_chat(tokenizer, text), tokenizer.stop_ids | stop_token_ids(template, tokenizer), template)
