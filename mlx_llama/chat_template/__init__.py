"""Chat templates: a conversation → the prompt text the model was trained on.

Renders the Jinja2 `tokenizer.chat_template` of a GGUF file exactly as Hugging Face
`transformers`' `apply_chat_template(..., tokenize=False)` does, or one of the built-in templates
(`BUILTIN_TEMPLATES`) for files that carry none:

    tmpl = template_for(gguf.metadata)                  # the file's own template
    tmpl = template_for(gguf.metadata, "llama-2")       # or a built-in, by name
    text = tmpl.render([{"role": "user", "content": "Hi"}])        # add_generation_prompt=True
    ids = encode_chat(tokenizer, text)                  # BOS as llama.cpp's chat mode
    stops = tokenizer.stop_ids | stop_token_ids(tmpl, tokenizer)

The Jinja environment is set up as transformers sets it up: `ImmutableSandboxedEnvironment`
(templates are untrusted code from the Hub; touching `__class__`, `list.append`… raises), with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and the `{% generation %}` tag,
transformers' `tojson` filter (no HTML escaping, `ensure_ascii=False`, `indent`/`separators`/
`sort_keys` options) and its globals `raise_exception`, `strftime_now`, `dict` and a `namespace`
that refuses underscore-prefixed names. The template sees `messages`, `add_generation_prompt`,
`tools`, `documents`, the special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token` where
the file has them) and any extra keyword arguments, which override the special tokens. As in
transformers, messages are copied into plain JSON-like data and keys whose value is None dropped.

Every failure is a `ChatTemplateError` (a `MlxLlamaError`, one line): a template calling
`raise_exception(msg)` gives its subclass `TemplateRaisedError` whose `.message` is `msg`; the
sandbox refusing an attribute gives `ChatTemplateSecurityError`; a render past its limits (1 s,
1 MB of output, huge powers, repetitions or indents: `RenderLimits`, per template or by
`set_render_limits`) gives `ChatTemplateLimitError`.

Incremental chat. Rendering is deterministic (only `strftime_now` reads the clock), and for the
built-in templates and SmolLM2's, the rendering of the first n messages is a prefix of the
rendering of the first n+1 (with add_generation_prompt=False; with True as well when message n+1
is the assistant's reply), so a caller can re-render the whole conversation each turn and prefill
only the new suffix. What the model *generated* is a different matter: a caller's KV cache holds
`render(history, True) + reply + end_of_turn`, and that is a prefix of the re-rendering for
ChatML/SmolLM2, zephyr and llama-3 (with a reply lacking surrounding whitespace: llama-3 trims
it), but not for llama-2, whose template writes `' ' + reply.strip() + ' ' + eos_token` — a space
the model does not generate before `</s>`. A caller should compare texts (or tokens) and re-prefill
from the first difference. Note also that tokenizing a suffix alone can differ from tokenizing
the whole text at the seam; the seams here sit next to special tokens for ChatML and llama-3.

The modules:

    template.py  `ChatTemplate`, `template_for` and the helpers callers use around them
    sandbox.py   the Jinja environment and the data a template sees (transformers' setup)
    limits.py    the bounds every render runs under: time, output, the values it builds
    probe.py     what a template writes around the messages, read off probe renderings
    builtin.py   the built-in templates

The errors are `mlx_llama.errors`' (one family), exported here too.
"""

from ..errors import ChatTemplateError, ChatTemplateLimitError, ChatTemplateSecurityError, TemplateRaisedError
from .builtin import BUILTIN_TEMPLATES
from .limits import RenderLimits, default_limits, set_render_limits
from .template import (ChatTemplate, check_file_template, encode_chat, looks_templated, special_tokens, stop_token_ids,
                       template_for)

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatTemplateLimitError",
    "RenderLimits",
    "ChatTemplateSecurityError",
    "check_file_template",
    "default_limits",
    "TemplateRaisedError",
    "encode_chat",
    "looks_templated",
    "set_render_limits",
    "special_tokens",
    "stop_token_ids",
    "template_for",
]
