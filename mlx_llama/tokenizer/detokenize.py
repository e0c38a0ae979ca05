"""Token ids → text, as llama.cpp's `llama_detokenize` does it, one token at a time.

The pieces themselves come from `Tokenizer.token_to_piece`; what is added here is what depends
on the neighbouring tokens: the leading space SentencePiece vocabularies drop, UTF-8 characters
split over several tokens, and the space clean-up of BPE vocabularies (" ." → ".").
"""

from __future__ import annotations

import codecs
import re
from typing import Protocol


class _Vocabulary(Protocol):
    """What the detokenizer reads of a `Tokenizer` (named here, not imported: vocab.py imports this module)."""

    add_space_prefix: bool
    clean_spaces: bool

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes: ...


class StreamingDetokenizer:
    """Incremental `Tokenizer.decode`: `add(id)` returns the newly completed text.

    Bytes go through an incremental UTF-8 decoder, so an unfinished multi-byte character is
    held back until its last byte arrives; the space clean-up (when the vocabulary uses it)
    holds back the few characters whose fate depends on what follows. Each token costs O(its
    length), and the concatenation of everything returned equals `decode(ids)` (with
    `continuation`: the text `decode` gives these ids after a prefix, less the prefix's text).
    """

    def __init__(self, tokenizer: _Vocabulary, special: bool = False, continuation: bool = False):
        self._tok = tokenizer
        self._special = special
        self._strip_space = tokenizer.add_space_prefix and not continuation  # only the first token's
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._clean = _SpaceCleaner() if tokenizer.clean_spaces else None

    def add(self, token_id: int) -> str:
        piece = self._tok.token_to_piece(token_id, self._special)
        if self._strip_space:
            # llama.cpp drops one leading space of the first token, even when that token is
            # BOS and renders as nothing: then no space is dropped at all.
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        text = self._utf8.decode(piece)
        return self._clean.feed(text) if self._clean else text

    def finalize(self) -> str:
        """Flush what was held back (an incomplete UTF-8 sequence becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        if self._clean:
            text = self._clean.feed(text) + self._clean.flush()
        return text


# llama.cpp's `clean_spaces` detokenizer passes (llama_vocab::impl::detokenize), one after the
# other over the whole text: drop a space before ? ! . , ; " ' " → "'" (left to right, without
# overlaps); drop the space of " 's", " 'm", " 're", " 've". They only touch ASCII, so running
# them after the UTF-8 decoding (rather than on bytes) changes nothing.
_CLEAN_PASSES = (
    (re.compile(r" (?=[?!.,])"), ""),
    (re.compile(r" ' "), "'"),
    (re.compile(r" (?='(?:s|m|re|ve))"), ""),
)


def clean_spaces(text: str) -> str:
    """llama.cpp's space clean-up of a whole detokenized text."""
    for pattern, repl in _CLEAN_PASSES:
        text = pattern.sub(repl, text)
    return text


class _SpaceCleaner:
    """llama.cpp's `clean_spaces` detokenizer passes (see clean_spaces), as streaming state machines.

    The three passes run one after the other over the whole text in llama.cpp:
      1. drop a space before ? ! . ,
      2. " ' " → "'" (both spaces dropped; scanning left to right, non-overlapping)
      3. drop the space of " 's", " 'm", " 're", " 've"
    Each stage below keeps only the short suffix that may still change and passes the rest on.
    """

    def __init__(self):
        self._held = ["", "", ""]  # per pass: the pending text it may still rewrite

    def feed(self, text: str) -> str:
        for step in (self._pass1, self._pass2, self._pass3):
            text = "".join(map(step, text))
        return text

    def flush(self) -> str:
        text = ""
        for k, step in enumerate((self._pass1, self._pass2, self._pass3)):
            text = "".join(map(step, text))
            text, self._held[k] = text + self._held[k], ""
        return text

    def _pass1(self, c: str) -> str:
        held = self._held[0]  # "" or " "
        out = "" if held and c in "?!.," else held
        self._held[0] = " " if c == " " else ""
        return out if c == " " else out + c

    def _pass2(self, c: str) -> str:
        held = self._held[1]  # "", " " or " '"
        if held == " '":
            self._held[1] = ""
            # " ' " → "'": the trailing space is consumed and cannot start another match
            return "'" if c == " " else " '" + self._pass2(c)
        if held == " " and c == "'":
            self._held[1] = " '"
            return ""
        self._held[1] = " " if c == " " else ""
        return held if c == " " else held + c

    def _pass3(self, c: str) -> str:
        held = self._held[2]  # "", " ", " '", " 'r" or " 'v"
        if held in (" 'r", " 'v"):
            self._held[2] = ""
            return held[1:] + c if c == "e" else held + self._pass3(c)
        if held == " '":
            if c in "rv":
                self._held[2] = held + c
                return ""
            self._held[2] = ""
            return "'" + c if c in "sm" else held + self._pass3(c)
        if held == " " and c == "'":
            self._held[2] = " '"
            return ""
        self._held[2] = " " if c == " " else ""
        return held if c == " " else held + c
