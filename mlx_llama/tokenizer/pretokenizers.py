r"""Pre-tokenizers: how byte-level BPE text is cut into words before merging, per `tokenizer.ggml.pre`.

Each entry of REGEXES lists the regexes llama.cpp applies one after the other: every regex
splits each piece left by the previous one into matches and the text between them (HF's
`Split(..., behavior="isolated")`). They are written with \p{L}, \p{N}, \p{M}, \p{P} and \s and
run on Python's `re` once `python_regex` has spelled those out as llama.cpp's own character
tables (unicode_data.py); `re`'s backtracking semantics are those of llama.cpp's regexes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .unicode_data import UNICODE_RANGES, WHITESPACE

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Case-insensitive contractions are spelled out as llama.cpp does ((?i:...) is not portable).
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Written with escapes: several of these characters have canonical equivalents that editors
# silently normalise, which would change (or break) the character ranges.
# llama.cpp runs regexes without \p{..} through std::wregex after replacing every non-ASCII
# whitespace character by \v, so literal whitespace inside these classes never matches
# there: the ranges leave out the whitespace in U+0800..U+4E00 (U+1680, U+2000..U+200A,
# U+2028, U+2029, U+202F, U+205F, U+3000), and the last range of _DEEPSEEK_PUNCT starts at U+3001.
_DEEPSEEK_CJK = (
    "[\u4e00-\u9fa5\u0800-\u167f\u1681-\u1fff\u200b-\u2027\u202a-\u202e\u2030-\u205e"
    "\u2060-\u2fff\u3001-\u4e00\uac00-\ud7ff]+"
)
_DEEPSEEK_LATIN = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)
_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+"

REGEXES = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "digits+gpt2": [r"\p{N}", _GPT2],  # starcoder, smollm, refact, ...: every digit on its own
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LATIN, _DEEPSEEK_PUNCT, r"\s+$", _DEEPSEEK_CJK, r"\p{N}+"],
}


@dataclass(frozen=True)
class PreTokenizer:
    """What one `tokenizer.ggml.pre` value means: the regex chain and llama.cpp's settings for it."""

    regexes: str  # key of REGEXES
    clean_spaces: bool = True  # llama.cpp's default for BPE vocabularies
    ignore_merges: bool = False  # a pre-token that is itself in the vocab is emitted whole
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent


# `tokenizer.ggml.pre` → pre-tokenizer, as llama.cpp maps the names it knows.
PRE_TOKENIZERS = {
    "default": PreTokenizer("default"),
    "gpt-2": PreTokenizer("gpt2"),
    "phi-2": PreTokenizer("gpt2"),
    "mpt": PreTokenizer("gpt2"),
    "olmo": PreTokenizer("gpt2"),
    "smollm": PreTokenizer("digits+gpt2", clean_spaces=False),
    "starcoder": PreTokenizer("digits+gpt2"),
    "refact": PreTokenizer("digits+gpt2"),
    "codeshell": PreTokenizer("digits+gpt2"),
    "command-r": PreTokenizer("digits+gpt2", clean_spaces=False),
    "falcon": PreTokenizer("falcon"),
    "llama3": PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-v3": PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-bpe": PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "falcon3": PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "dbrx": PreTokenizer("llama3"),
    "smaug-bpe": PreTokenizer("llama3"),
    "qwen2": PreTokenizer("qwen2", clean_spaces=False),
    "deepseek-r1-qwen": PreTokenizer("qwen2", clean_spaces=False),
    "stablelm2": PreTokenizer("qwen2"),
    "megrez": PreTokenizer("qwen2"),
    "qwen35": PreTokenizer("qwen35", clean_spaces=False),
    "deepseek-coder": PreTokenizer("deepseek-coder", clean_spaces=False),
    "deepseek-llm": PreTokenizer("deepseek-llm", clean_spaces=False),
}


# --------------------------------------------------------------------------------------------
# The regexes above, spelled out for Python's `re`
# --------------------------------------------------------------------------------------------


def _class_char(cp: int) -> str:
    c = chr(cp)
    return re.escape(c) if cp < 128 else c


def _category_class(cat: str) -> str:
    """The inside of a regex character class matching llama.cpp's category `cat`."""
    parts = []
    for r in UNICODE_RANGES[cat].split():
        a, _, b = r.partition("-")
        parts.append(_class_char(int(a, 16)) + (f"-{_class_char(int(b, 16))}" if b else ""))
    return "".join(parts)


def python_regex(regex: str) -> str:
    """`regex` for Python's `re`, with llama.cpp's character classes and anchors.

    \\p{X} becomes llama.cpp's code point ranges of category X, \\s (\\S) its whitespace (or
    the rest), and `$` the end of the piece (std::regex has no multi-line mode).
    """
    out, inside, i = [], False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            m = re.match(r"\\p\{(\w+)\}", regex[i:])
            if m:
                cls = _category_class(m.group(1))  # KeyError: a category llama.cpp's regexes never use
                out.append(cls if inside else f"[{cls}]")
                i += m.end()
                continue
            esc = regex[i:i + 2]
            if esc == "\\s":
                out.append(WHITESPACE if inside else f"[{WHITESPACE}]")
            elif esc == "\\S" and not inside:
                out.append(f"[^{WHITESPACE}]")
            elif esc in ("\\S", "\\d", "\\D", "\\w", "\\W", "\\b", "\\B"):
                raise ValueError(f"{esc} has no llama.cpp equivalent here: {regex!r}")
            else:
                out.append(esc)
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        elif c == "&" and inside and regex.startswith("&&", i):
            raise ValueError(f"class intersection is not supported: {regex!r}")
        out.append(c)
        i += 1
    return "".join(out)
