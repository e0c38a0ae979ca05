"""What a token is made of: llama.cpp's attribute bits, and the alphabets token texts are spelled in.

A token's text means different bytes depending on its kind: SentencePiece byte tokens are
written `<0xXX>`, byte-level BPE tokens spell every byte with one of GPT-2's 256 printable
characters. Both the engines (encoding) and the decoder (rendering pieces) read them here.
"""

from __future__ import annotations

import re


class Attr:
    """llama.cpp's per-token attribute bits (`llama_token_attr`); only the ones we act on.

    Plain ints rather than an IntFlag: they are tested for every token of large vocabularies.
    """

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# `tokenizer.ggml.token_type` values (gguf's TokenType) → attribute.
TYPE_TO_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}

# SentencePiece's byte tokens: the text of a BYTE token names the byte it stands for.
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted to 256+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


BYTE_OF_CHAR = _gpt2_byte_chars()
# bytes (as latin-1 characters) → GPT-2's byte-level characters, for str.translate
BYTE_LEVEL = {b: c for c, b in BYTE_OF_CHAR.items()}


def byte_level_decode(text: str) -> bytes:
    """GPT-2 byte-level token text → bytes. llama.cpp spells unmappable characters out."""
    try:
        return bytes(BYTE_OF_CHAR[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = BYTE_OF_CHAR.get(c)
            if b is not None:
                out.append(b)
            else:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)
