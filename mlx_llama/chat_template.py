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
sandbox refusing an attribute gives `ChatTemplateSecurityError`.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .errors import MlxLlamaError

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatTemplateSecurityError",
    "TemplateRaisedError",
    "encode_chat",
    "looks_templated",
    "special_tokens",
    "stop_token_ids",
    "template_for",
]


class ChatTemplateError(MlxLlamaError):
    """A chat template that cannot be chosen, compiled or rendered."""


class TemplateRaisedError(ChatTemplateError):
    """The template called `raise_exception(message)`; `.message` is the template's text."""

    def __init__(self, message: str, template_name: str = "chat template"):
        self.message = str(message)
        self.template_name = template_name
        super().__init__(f"{template_name}: {self.message}")


class ChatTemplateSecurityError(ChatTemplateError):
    """The sandbox refused something the template did (dunder attributes, mutating methods…)."""


# ---------------------------------------------------------------------------------------------
# built-in templates: the Jinja sources of the model families' own tokenizer_config.json
# ---------------------------------------------------------------------------------------------

# meta-llama/Llama-2-7b-chat-hf. `'\\n'` is a backslash-n escape inside a Jinja string literal,
# as in the JSON file; the system prompt is folded into the first user turn.
_LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 (Zephyr's format). The newlines between the tags are part of
# the source: trim_blocks removes those after `%}`, the ones after `}}` reach the output.
_ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# ChatML, as transformers' former default template (SmolLM2's minus its default system prompt).
_CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct.
_LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-2": _LLAMA_2,
    "llama-3": _LLAMA_3,
    "zephyr": _ZEPHYR,
}


def _norm_name(name: str) -> str:
    return re.sub(r"[-_\s.]", "", name.lower())  # "llama2", "Llama_3", "ChatML" are accepted


# ---------------------------------------------------------------------------------------------
# the Jinja environment (transformers' `_compile_jinja_template`, reimplemented)
# ---------------------------------------------------------------------------------------------


def _raise_exception(message):
    raise TemplateRaisedError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _environment():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        import jinja2.utils
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover
        raise ChatTemplateError("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from e
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # older versions have known sandbox escapes, and templates are untrusted code
        raise ChatTemplateError(f"chat templates need jinja2>=3.1.6 (installed: {jinja2.__version__})")

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=1)` must work
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str):
    return _environment().from_string(source)


# ---------------------------------------------------------------------------------------------
# template data (transformers' `_normalize_chat_messages` / `_plain_template_data`)
# ---------------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """A copy built of plain JSON-like types only, so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":  # numpy scalars
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (OpenAI SDK messages)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(messages) -> list[dict]:
    messages = getattr(messages, "messages", messages)
    out = []
    for m in messages:
        m = _plain(m)
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}  # OpenAI-style content=None etc.
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ---------------------------------------------------------------------------------------------
# the template
# ---------------------------------------------------------------------------------------------


class ChatTemplate:
    """One compiled chat template plus the special-token texts it is rendered with.

    `name` ("gguf", a built-in name, or whatever the caller chose), `source` (the Jinja text),
    `special_tokens` (dict: bos_token, eos_token, … → text), `bos_token`, `eos_token`.
    Derived from probe renderings (cached): `generation_prompt`, `end_of_turn` (what ends an
    assistant turn, for the stop set) and `markers` (the template's fixed texts, for
    `looks_templated`).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, name: str = "chat template",
                 **tokens: str):
        if not isinstance(source, str) or not source:
            raise ChatTemplateError(f"{name}: the chat template is empty")
        self.name = name
        self.source = source
        self.special_tokens = {k: str(v) for k, v in {**(special_tokens or {}), **tokens}.items() if v is not None}
        try:
            self._template = _compile(source)
        except ChatTemplateError:
            raise
        except Exception as e:
            raise self._error(e) from e
        self._probe = None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def __repr__(self):
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    def _error(self, e: Exception) -> ChatTemplateError:
        import jinja2

        if isinstance(e, TemplateRaisedError):
            return TemplateRaisedError(e.message, self.name)
        if isinstance(e, jinja2.exceptions.SecurityError):
            return ChatTemplateSecurityError(f"{self.name}: unsafe operation refused by the sandbox: {e}")
        if isinstance(e, jinja2.exceptions.TemplateSyntaxError):
            return ChatTemplateError(f"{self.name}: syntax error on line {e.lineno}: {e.message}")
        if isinstance(e, jinja2.exceptions.TemplateError):
            return ChatTemplateError(f"{self.name}: {type(e).__name__}: {e}")
        return ChatTemplateError(f"{self.name}: rendering failed: {type(e).__name__}: {e}")

    def render(self, messages, add_generation_prompt: bool = True, *, tools=None, documents=None, **kwargs) -> str:
        """The prompt text of `messages` (dicts with "role" and "content", oldest first).

        Equals transformers' `apply_chat_template(messages, tokenize=False,
        add_generation_prompt=…, tools=…, documents=…, **kwargs)` with this template and the same
        special tokens. Note the default here is add_generation_prompt=True (transformers':
        False): the usual call asks for the assistant's reply.
        """
        data = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=_messages(messages), tools=_plain(tools),
                                         documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                                         **data)
        except ChatTemplateError as e:
            raise self._error(e) if isinstance(e, TemplateRaisedError) else e
        except Exception as e:
            raise self._error(e) from e

    __call__ = render

    # -- what the template writes around the messages -------------------------------------------

    def _analysis(self) -> dict:
        if self._probe is None:
            self._probe = _analyze(self)
        return self._probe

    @property
    def generation_prompt(self) -> str:
        """What add_generation_prompt=True appends after a user turn ("" when nothing or unknown)."""
        return self._analysis()["generation_prompt"]

    @property
    def end_of_turn(self) -> tuple[str, ...]:
        """The texts the template writes after an assistant message (e.g. ("<|im_end|>",))."""
        return self._analysis()["end_of_turn"]

    @property
    def markers(self) -> tuple[str, ...]:
        """Fixed texts the template writes around messages (role headers, turn ends, BOS/EOS)."""
        return self._analysis()["markers"]


# probe contents: no whitespace (templates strip/trim), nothing a template would transform
_P_SYS, _P_U1, _P_A1, _P_U2 = "Mlxq7Sys", "Mlxq7UserOne", "Mlxq7Reply", "Mlxq7UserTwo"


def _between(text: str | None, a: str | None, b: str | None) -> str | None:
    """The text after `a` (or from the start) and before `b` (or to the end); None if absent."""
    if text is None:
        return None
    i = 0
    if a is not None:
        i = text.find(a)
        if i < 0:
            return None
        i += len(a)
    j = len(text)
    if b is not None:
        j = text.find(b, i)
        if j < 0:
            return None
    return text[i:j]


def _analyze(tmpl: ChatTemplate) -> dict:
    """Render probe conversations and read off the texts the template puts around messages."""

    def render(msgs, gen):
        try:
            return tmpl.render([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=gen)
        except ChatTemplateError:
            return None

    u = [("user", _P_U1)]
    ua = u + [("assistant", _P_A1)]
    uau = ua + [("user", _P_U2)]
    r_u, r_u_gen = render(u, False), render(u, True)
    r_ua, r_uau = render(ua, False), render(uau, False)
    r_su = render([("system", _P_SYS)] + u, False)

    user_end = _between(r_u, _P_U1, None)
    asst_end = _between(r_ua, _P_A1, None)
    user_start = _between(r_uau, _P_A1, _P_U2)
    if asst_end is not None and user_start is not None and user_start.startswith(asst_end):
        user_start = user_start[len(asst_end):]
    asst_start = _between(r_ua, _P_U1, _P_A1)
    if asst_start is not None and user_end and asst_start.startswith(user_end):
        asst_start = asst_start[len(user_end):]
    sys_end = _between(r_su, _P_SYS, _P_U1)
    if sys_end is not None and user_start and sys_end.endswith(user_start):
        sys_end = sys_end[: len(sys_end) - len(user_start)]
    gen = ""
    if r_u is not None and r_u_gen is not None and r_u_gen.startswith(r_u):
        gen = r_u_gen[len(r_u):]
    # (the text before the first user message is left out: it may hold a default system prompt)
    pieces = [user_start, user_end, asst_start, asst_end, gen, _between(r_su, None, _P_SYS), sys_end]

    specials = [t for t in (tmpl.bos_token, tmpl.eos_token) if t]
    return {
        "generation_prompt": gen,
        "end_of_turn": _chunks([asst_end], specials),
        "markers": _chunks(pieces, specials),
    }


def _chunks(pieces, specials) -> tuple[str, ...]:
    """Whitespace-separated chunks of the pieces, BOS/EOS texts split out, probe texts excluded;
    plain words (no punctuation) and chunks shorter than 3 characters are dropped."""
    out: list[str] = []
    split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") \
        if specials else None
    for piece in pieces:
        if not piece:
            continue
        parts = [p for p in split.split(piece) if p] if split else [piece]
        for part in parts:
            for chunk in ([part] if part in specials else part.split()):
                if (len(chunk) >= 3 and not chunk.isalnum() and "Mlxq7" not in chunk and chunk not in out):
                    out.append(chunk)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# choosing a template
# ---------------------------------------------------------------------------------------------


def special_tokens(metadata: Mapping) -> dict[str, str]:
    """bos_token/eos_token/unk_token/pad_token texts from `tokenizer.ggml.*_token_id` and the vocabulary.

    Missing ids fall back to llama.cpp's defaults for SentencePiece vocabularies (BOS 1, EOS 2,
    UNK 0); out-of-range ids are ignored, as llama.cpp does.
    """
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if metadata.get("tokenizer.ggml.model") == "llama" else {}
    out = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id", defaults.get(key))
        if i is not None and 0 <= int(i) < len(tokens):
            out[name] = str(tokens[int(i)])
    return out


def _file_templates(metadata: Mapping) -> dict[str, str]:
    """Named templates stored as `tokenizer.chat_template.NAME` (e.g. "tool_use")."""
    prefix = "tokenizer.chat_template."
    return {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix) and isinstance(v, str) and v}


def template_for(metadata: Mapping, name: str | None = None) -> ChatTemplate:
    """The chat template to use for a GGUF file's metadata.

    name=None: the file's own `tokenizer.chat_template` (a `ChatTemplateError` telling to pass
    `--chat-template NAME` when it has none). Otherwise a built-in (`BUILTIN_TEMPLATES`: chatml,
    llama-2, llama-3, zephyr; "llama2", "ChatML"… accepted) or one of the file's named templates
    (`tokenizer.chat_template.NAME`); an unknown name is an error listing the choices. The special
    tokens come from the file's vocabulary in every case.
    """
    tokens = special_tokens(metadata)
    named = _file_templates(metadata)
    if name is None:
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(
                "the model file has no chat template (tokenizer.chat_template); pass --chat-template NAME "
                f"with NAME one of: {', '.join(sorted(BUILTIN_TEMPLATES))}")
        return ChatTemplate(source, tokens, name="gguf")
    key = _norm_name(name)
    for builtin, source in BUILTIN_TEMPLATES.items():
        if _norm_name(builtin) == key:
            return ChatTemplate(source, tokens, name=builtin)
    if name in named:
        return ChatTemplate(named[name], tokens, name=f"gguf:{name}")
    choices = sorted(BUILTIN_TEMPLATES) + sorted(named)
    raise ChatTemplateError(f"unknown chat template {name!r} (choices: {', '.join(choices)})")


# ---------------------------------------------------------------------------------------------
# helpers for callers
# ---------------------------------------------------------------------------------------------


def looks_templated(prompt: str, template: ChatTemplate) -> bool:
    """True when `prompt` already contains the template's markers, i.e. the user formatted it
    by hand and wrapping it again as a user message would template it twice."""
    return any(m in prompt for m in template.markers)


def stop_token_ids(template: ChatTemplate, tokenizer) -> set[int]:
    """Token ids of the end-of-turn markers that are single tokens of `tokenizer` (special
    tokens parsed); add them to the tokenizer's own `stop_ids`."""
    ids = set()
    for marker in template.end_of_turn:
        enc = tokenizer.encode(marker, add_special=False, parse_special=True)
        if len(enc) == 1:
            ids.add(enc[0])
    return ids


def _token_text(tokenizer, token_id) -> str | None:
    if token_id is None:
        return None
    return tokenizer.token_to_piece(token_id, special=True).decode("utf-8", errors="replace")


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered conversation, as llama.cpp's chat mode makes them.

    Special tokens written by the template are parsed. When the vocabulary adds BOS
    (`tokenizer.add_bos`) a BOS text at the start of `text` is dropped before BOS is added, so a
    template that writes `bos_token` itself (llama-2, llama-3) gets one BOS, not two; likewise
    for a trailing EOS with `add_eos`. Templates that write no BOS (zephyr) get the vocabulary's
    BOS here, where transformers (`apply_chat_template(tokenize=True)`, which adds no special
    tokens) gives none. For SmolLM2 (add_bos false) both agree: the text's tokens, nothing added.
    """
    if getattr(tokenizer, "add_bos", False):
        bos = _token_text(tokenizer, tokenizer.bos_id)
        if bos and text.startswith(bos):
            text = text[len(bos):]
    if getattr(tokenizer, "add_eos", False):
        eos = _token_text(tokenizer, tokenizer.eos_id)
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
    return tokenizer.encode(text, add_special=True, parse_special=True)
