"""The public API: `ChatTemplate`, choosing one (`template_for`), and the helpers callers use
around it (`special_tokens`, `encode_chat`, `stop_token_ids`, `looks_templated`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ChatTemplateError, ChatTemplateLimitError, ChatTemplateSecurityError, GGUFError, TemplateRaisedError
from .builtin import BUILTIN_TEMPLATES, norm_name
from .limits import RenderLimits, run_limited
from .probe import analyze
from .sandbox import compile_template, plain, plain_messages


class ChatTemplate:
    """One compiled chat template plus the special-token texts it is rendered with.

    `name` ("gguf", a built-in name, or whatever the caller chose), `source` (the Jinja text),
    `special_tokens` (dict: bos_token, eos_token, … → text), `bos_token`, `eos_token`.
    Derived from probe renderings (cached): `generation_prompt`, `end_of_turn` (what ends an
    assistant turn, for the stop set) and `markers` (the template's fixed texts, for
    `looks_templated`).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, name: str = "chat template",
                 *, limits: RenderLimits | None = None, **tokens: str):
        if not isinstance(source, str) or not source:
            raise ChatTemplateError(f"{name}: the chat template is empty")
        self.name = name
        self.limits = limits  # None: `default_limits()` at each render
        self.source = source
        self.special_tokens = {k: str(v) for k, v in {**(special_tokens or {}), **tokens}.items() if v is not None}
        try:
            self._template = compile_template(source)
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
        False): the usual call asks for the assistant's reply. Runs under `self.limits` (time,
        output size, ...: a `ChatTemplateLimitError` past them).
        """
        data = {**self.special_tokens, **plain(kwargs)}
        messages = plain_messages(messages)
        try:
            return run_limited(lambda: self._template.render(
                messages=messages, tools=plain(tools), documents=plain(documents),
                add_generation_prompt=add_generation_prompt, **data), self.limits)
        except ChatTemplateLimitError as e:
            raise ChatTemplateLimitError(f"{self.name}: {e}") from None
        except ChatTemplateError as e:
            raise self._error(e) if isinstance(e, TemplateRaisedError) else e
        except Exception as e:
            raise self._error(e) from e

    __call__ = render

    # -- what the template writes around the messages -------------------------------------------

    def _analysis(self) -> dict:
        if self._probe is None:
            self._probe = analyze(self)
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


# -- choosing a template ------------------------------------------------------------------------


def special_tokens(metadata: Mapping) -> dict[str, str]:
    """bos_token/eos_token/unk_token/pad_token texts from `tokenizer.ggml.*_token_id` and the vocabulary.

    Missing ids fall back to llama.cpp's defaults for SentencePiece vocabularies (BOS 1, EOS 2,
    UNK 0); ids that are not token ids are left out (`Tokenizer` refuses such files).
    """
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if metadata.get("tokenizer.ggml.model") == "llama" else {}
    out = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id", defaults.get(key))
        if type(i) is int and 0 <= i < len(tokens):  # others: the tokenizer refuses the file
            out[name] = str(tokens[i])
    return out


def _file_templates(metadata: Mapping) -> dict[str, str]:
    """Named templates stored as `tokenizer.chat_template.NAME` (e.g. "tool_use")."""
    prefix = "tokenizer.chat_template."
    return {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix) and isinstance(v, str) and v}


def template_for(metadata: Mapping, name: str | None = None, *, limits: RenderLimits | None = None) -> ChatTemplate:
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
        return ChatTemplate(source, tokens, name="gguf", limits=limits)
    key = norm_name(name)
    for builtin, source in BUILTIN_TEMPLATES.items():
        if norm_name(builtin) == key:
            return ChatTemplate(source, tokens, name=builtin, limits=limits)
    if name in named:
        return ChatTemplate(named[name], tokens, name=f"gguf:{name}", limits=limits)
    choices = sorted(BUILTIN_TEMPLATES) + sorted(named)
    raise ChatTemplateError(f"unknown chat template {name!r} (choices: {', '.join(choices)})")


def check_file_template(path, metadata: Mapping) -> None:
    """Render a file's own template once (one user message, the assistant's turn opened), so
    that a template which cannot be compiled or rendered, or runs past the render limits, is
    reported as a `GGUFError` naming the key when the file is opened, before its weights are read."""
    source = metadata.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():  # none (a non-string: `Tokenizer` refuses it)
        return
    try:
        ChatTemplate(source, special_tokens(metadata), name="tokenizer.chat_template").render(
            [{"role": "user", "content": "Hello"}])
    except ChatTemplateError as e:
        raise GGUFError(path, str(e)) from None


# -- helpers for callers ------------------------------------------------------------------------


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
