"""The vocabulary checked before anything is built from it: key types, array lengths, token ids,
duplicates and byte tokens.

A GGUF vocabulary is a few parallel arrays (`tokenizer.ggml.tokens`, `token_type`, `scores`)
and ids into them. llama.cpp trusts them: a short scores array is read past its end, a
duplicate token trips an assertion, a missing byte token throws in the middle of tokenizing.
Here each such file is one `GGUFError` naming the key, before an engine is built. As with the
`{arch}.*` keys, nothing in `tokenizer.ggml.*` is silently ignored: a key this module does not
know is refused, so that a damaged key name cannot drop a setting and change the tokens.
"""

from __future__ import annotations

import math

from ..errors import GGUFError
from .alphabet import BYTE_TOKEN

_TOKEN_TYPE_BYTE = 6  # gguf's TokenType.BYTE

# tokenizer.ggml.<name> → what its value must be.
_IDS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask", "prefix", "suffix", "middle",
        "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
GGML_KEYS: dict[str, str] = {
    "model": "str", "pre": "str", "tokens": "strings", "token_type": "ints", "token_type_count": "int",
    "scores": "floats", "merges": "strings", "precompiled_charsmap": "ints",
    **{f"{role}_token_id": "id" for role in _IDS},
    **{key: "bool" for key in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
                               "remove_extra_whitespaces")},
}
# Other tokenizer.* keys we read or pass on: checked for their type only.
OTHER_KEYS = {"tokenizer.chat_template": "str", "tokenizer.chat_templates": "strings",
              "tokenizer.huggingface.json": "str", "tokenizer.rwkv.world": "str"}

_SCALARS = {"str": str, "bool": bool, "int": int, "id": int}
_ITEMS = {"strings": str, "ints": int, "floats": float}


def check_vocabulary(path: str, md: dict) -> None:
    """Raise a `GGUFError` naming the key for the first thing wrong with `md`'s vocabulary."""
    for key, value in md.items():
        if key.startswith("tokenizer."):
            _check_type(path, key, value, _kind(path, key))
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(path, "missing metadata key 'tokenizer.ggml.tokens'")
    n = len(tokens)
    if n == 0:
        raise GGUFError(path, "metadata key 'tokenizer.ggml.tokens' is empty")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in md and len(md[key]) != n:
            raise GGUFError(path, f"metadata key {key!r} has {len(md[key])} items but tokenizer.ggml.tokens has {n}")
    scores = md.get("tokenizer.ggml.scores")
    if scores is not None and not all(map(math.isfinite, scores)):
        i = next(i for i, s in enumerate(scores) if not math.isfinite(s))
        raise GGUFError(path, f"metadata key 'tokenizer.ggml.scores': item {i} is {scores[i]} (must be finite)")
    for role in _IDS:
        key = f"tokenizer.ggml.{role}_token_id"
        if key in md and not 0 <= md[key] < n:
            raise GGUFError(path, f"metadata key {key!r} = {md[key]} is not a token id (the vocabulary has {n} tokens)")
    _check_unique(path, tokens)
    if md.get("tokenizer.ggml.model") == "llama":
        _check_byte_tokens(path, tokens, md.get("tokenizer.ggml.token_type"))


def _kind(path: str, key: str) -> str | None:
    if key.startswith("tokenizer.ggml."):
        kind = GGML_KEYS.get(key[len("tokenizer.ggml."):])
        if kind is None:
            raise GGUFError(path, f"metadata key {key!r} is not a tokenizer key mlx_llama knows "
                                  "(a damaged name? known: " + ", ".join(sorted(GGML_KEYS)) + ")")
        return kind
    if key.startswith("tokenizer.chat_template."):
        return "str"
    return OTHER_KEYS.get(key)


def _check_type(path: str, key: str, value, kind: str | None) -> None:
    if kind is None:
        return
    if kind in _SCALARS:
        # bool is an int in Python; a GGUF BOOL is not a token id, nor a UINT32 a flag
        if type(value) is not _SCALARS[kind]:
            raise GGUFError(path, f"metadata key {key!r} has type {type(value).__name__}, expected {_SCALARS[kind].__name__}")
        return
    item = _ITEMS[kind]
    if type(value) is not list:
        raise GGUFError(path, f"metadata key {key!r} has type {type(value).__name__}, expected an array of {item.__name__}")
    # A GGUF array has one item type, so a wrong type shows in every item; all are checked, as
    # the value may also come from Python.
    wrong = next((v for v in value if type(v) is not item), None) if value else None
    if wrong is not None:
        raise GGUFError(path, f"metadata key {key!r} holds {type(wrong).__name__} items, expected {item.__name__}")


def _check_unique(path: str, tokens: list[str]) -> None:
    """Every token text once (llama.cpp asserts it; empty texts are renamed [EMPTY_i] there and here)."""
    if len(set(tokens)) == len(tokens):
        return
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t and t in seen:
            raise GGUFError(path, f"metadata key 'tokenizer.ggml.tokens': tokens {seen[t]} and {i} are both {t!r}")
        seen.setdefault(t, i)


def _check_byte_tokens(path: str, tokens: list[str], types) -> None:
    """SentencePiece vocabularies fall back to the 256 byte tokens `<0x00>`…`<0xFF>` (type BYTE)
    for text no other token covers, so each must be there, once."""
    if types is None:
        raise GGUFError(path, "missing metadata key 'tokenizer.ggml.token_type' (a SentencePiece vocabulary "
                              "needs it to mark its byte tokens)")
    held: dict[int, int] = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind != _TOKEN_TYPE_BYTE:
            continue
        m = BYTE_TOKEN.fullmatch(text)
        if m is None:
            raise GGUFError(path, f"metadata key 'tokenizer.ggml.token_type': token {i} {text!r} is typed BYTE "
                                  "but is not a byte token <0xXX>")
        byte = int(m.group(1), 16)
        if byte in held:
            raise GGUFError(path, f"metadata key 'tokenizer.ggml.tokens': tokens {held[byte]} and {i} are both byte 0x{byte:02X}")
        held[byte] = i
    if len(held) < 256:
        missing = next(b for b in range(256) if b not in held)
        raise GGUFError(path, f"metadata key 'tokenizer.ggml.tokens': byte fallback needs the 256 byte tokens "
                              f"<0x00>…<0xFF> (type BYTE); {256 - len(held)} are missing, <0x{missing:02X}> first")
