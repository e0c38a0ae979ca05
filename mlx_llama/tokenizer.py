"""Tokenizer built from GGUF metadata alone, matching llama.cpp token for token.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* ``gpt2``  – byte-level BPE. Encoding runs on a Hugging Face `tokenizers.Tokenizer` whose
  pre-tokenizer reproduces the regexes llama.cpp picks for `tokenizer.ggml.pre`.
* ``llama`` – SentencePiece BPE. Encoding runs on a `sentencepiece` processor built from a
  ModelProto assembled from the tokens, scores and token types.

What makes the result identical to llama.cpp rather than to the original HF/SP tokenizer is
the code around those engines, which follows `llama-vocab.cpp`: which tokens count as special
(including llama.cpp's text heuristics that promote e.g. `<|im_end|>` to a control token), how
special tokens are cut out of the text before the engine sees it, when BOS/EOS are added, how
pieces are rendered back to bytes and the clean-up llama.cpp applies when detokenizing.
"""

from __future__ import annotations

import codecs
import re
import struct
from dataclasses import dataclass

from .gguf_file import GGUFError

__all__ = ["Tokenizer", "StreamingDetokenizer"]


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
_TYPE_TO_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}

# --------------------------------------------------------------------------------------------
# Pre-tokenizers. Each entry lists the regexes llama.cpp applies one after the other: every
# regex splits each piece left by the previous one into matches and the text between them.
# That is exactly a chain of HF `Split(..., behavior="isolated")` steps.
# --------------------------------------------------------------------------------------------

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
# there; "&&\S" (and starting the last range at U+3001) reproduces that.
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&\\S]+"
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

_REGEXES = {
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
class _PreTokenizer:
    regexes: str  # key of _REGEXES
    clean_spaces: bool = True  # llama.cpp's default for BPE vocabularies
    ignore_merges: bool = False  # a pre-token that is itself in the vocab is emitted whole
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent


_PRE_TOKENIZERS = {
    "default": _PreTokenizer("default"),
    "gpt-2": _PreTokenizer("gpt2"),
    "phi-2": _PreTokenizer("gpt2"),
    "mpt": _PreTokenizer("gpt2"),
    "olmo": _PreTokenizer("gpt2"),
    "smollm": _PreTokenizer("digits+gpt2", clean_spaces=False),
    "starcoder": _PreTokenizer("digits+gpt2"),
    "refact": _PreTokenizer("digits+gpt2"),
    "codeshell": _PreTokenizer("digits+gpt2"),
    "command-r": _PreTokenizer("digits+gpt2", clean_spaces=False),
    "falcon": _PreTokenizer("falcon"),
    "llama3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-v3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-bpe": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "falcon3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "dbrx": _PreTokenizer("llama3"),
    "smaug-bpe": _PreTokenizer("llama3"),
    "qwen2": _PreTokenizer("qwen2", clean_spaces=False),
    "deepseek-r1-qwen": _PreTokenizer("qwen2", clean_spaces=False),
    "stablelm2": _PreTokenizer("qwen2"),
    "megrez": _PreTokenizer("qwen2"),
    "qwen35": _PreTokenizer("qwen35", clean_spaces=False),
    "deepseek-coder": _PreTokenizer("deepseek-coder", clean_spaces=False),
    "deepseek-llm": _PreTokenizer("deepseek-llm", clean_spaces=False),
}

# --------------------------------------------------------------------------------------------
# llama.cpp recognises some special tokens by their text (llama_vocab::impl::load).
# --------------------------------------------------------------------------------------------

# Candidates for the role ids when the metadata does not name them; the chosen token is
# forced to CONTROL.
_ROLE_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ROLE_CANDIDATES = frozenset(t for texts in _ROLE_TEXTS.values() for t in texts)
# Every token with one of these texts ends generation (and is forced to CONTROL).
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
# metadata key suffix (tokenizer.ggml.<key>) → role; later keys win, as in llama.cpp.
_ROLE_KEYS = (
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("padding_token_id", "pad"),
    ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"), ("fim_mid_token_id", "fim_mid"),
    ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"), ("fim_sep_token_id", "fim_sep"),
    ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"), ("middle_token_id", "fim_mid"),
)

_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by llama.cpp's lstrip/rstrip around special tokens
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


_BYTE_OF_CHAR = _gpt2_byte_chars()


class Tokenizer:
    """Text ↔ token ids for one GGUF vocabulary, with llama.cpp's semantics.

    Attributes: `model` ("gpt2" or "llama"), `pre` (pre-tokenizer name, BPE only), `vocab_size`,
    `bos_id`, `eos_id`, `eot_id`, `eom_id`, `pad_id`, `unk_id` (None when absent), `add_bos`,
    `add_eos`, `stop_ids` (every end-of-generation id, llama.cpp's `llama_vocab_is_eog`).
    """

    def __init__(self, path: str, metadata: dict):
        self.path = path
        md = metadata
        self.model = md.get("tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise GGUFError(path, f"unsupported tokenizer model {self.model!r} (supported: gpt2, llama)")
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError(path, "missing metadata key 'tokenizer.ggml.tokens'")
        # llama.cpp renames empty tokens so that every text is unique and non-empty.
        self._texts: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab_size = n = len(self._texts)
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            self._attr = [Attr.NORMAL] * n
        else:
            self._attr = [_TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types]

        is_bpe = self.model == "gpt2"
        if is_bpe:
            # llama.cpp falls back to "default" (with a loud warning) when the key is missing.
            self.pre = md.get("tokenizer.ggml.pre") or "default"
            pre = _PRE_TOKENIZERS.get(self.pre)
            if pre is None:
                raise GGUFError(path, f"unsupported tokenizer pre-tokenizer {self.pre!r}")
            self.clean_spaces = pre.clean_spaces  # detokenizer clean-up (" ." → ".")
            add_bos, add_space_prefix = pre.add_bos, False
            roles = {"bos": 11, "eos": 11}  # llama.cpp's BPE defaults (Falcon's ids)
        else:
            self.pre, pre = None, None
            self.clean_spaces = False
            add_bos, add_space_prefix = True, True
            roles = {"bos": 1, "eos": 2, "unk": 0}  # llama.cpp's SentencePiece defaults
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        # SentencePiece's "▁" in front of the text; decoding drops one leading space again.
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

        roles = {k: v for k, v in roles.items() if v < n}
        for key, role in _ROLE_KEYS:
            v = md.get(f"tokenizer.ggml.{key}")
            if v is not None and 0 <= int(v) < n:  # llama.cpp ignores out-of-range ids
                roles[role] = int(v)
        self._find_roles_by_text(roles)
        self.bos_id, self.eos_id, self.unk_id = roles.get("bos"), roles.get("eos"), roles.get("unk")
        self.eot_id, self.eom_id, self.pad_id = roles.get("eot"), roles.get("eom"), roles.get("pad")
        self.stop_ids = self._eog_ids(roles)

        # Phi-3 strips whitespace to the right of most of its special tokens.
        name = str(md.get("general.name", "")).lower()
        if "phi-3" in name or "phi3" in name:
            ids = {t: i for i, t in enumerate(self._texts) if t in ("</s>", "<unk>", "<s>", "<|endoftext|>")}
            for i in range(n):
                if self._attr[i] & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN):
                    self._attr[i] |= Attr.RSTRIP
            if "</s>" in ids:
                self._attr[ids["</s>"]] |= Attr.RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in ids:
                    self._attr[ids[t]] &= ~Attr.RSTRIP

        # Special tokens are cut out of the text longest first (tokenizer_st_partition).
        self._specials = sorted(
            (i for i in range(n) if self._attr[i] & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)),
            key=lambda i: -len(self._texts[i].encode()),
        )
        self._pieces: list[bytes | None] = [None] * n  # token_to_piece(special=True) cache
        if is_bpe:
            self._engine = _build_bpe(path, self._texts, md.get("tokenizer.ggml.merges"), pre)
            self._encode_raw = self._encode_bpe
        else:
            self._engine = _build_spm(path, self._texts, md.get("tokenizer.ggml.scores"), self._attr, self.unk_id,
                                      self.add_space_prefix)
            self._encode_raw = lambda texts: self._engine.encode(texts, out_type=int)

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """Build the tokenizer of a `GGUFFile` (anything with `.path` and `.metadata`)."""
        return cls(str(gguf_file.path), gguf_file.metadata)

    # -- special token discovery ----------------------------------------------------------------

    def _find_roles_by_text(self, roles: dict) -> None:
        """Fill eot/eom/fim roles the metadata left out by token text, as llama.cpp does.

        With several candidates llama.cpp's pick follows its hash map's iteration order; we
        take the earliest text in the candidate list instead (e.g. <|eot_id|> over
        <|end_of_text|>, <|im_end|> over <|endoftext|>).
        """
        ids = {t: i for i, t in enumerate(self._texts) if t in _ROLE_CANDIDATES}
        for role, texts in _ROLE_TEXTS.items():
            if role in roles:
                continue
            found = next((ids[t] for t in texts if t in ids), None)
            if found is not None:
                roles[role] = found
                self._attr[found] |= Attr.CONTROL

    def _eog_ids(self, roles: dict) -> set[int]:
        eog = {roles[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in roles}
        for i, text in enumerate(self._texts):
            if text in _EOG_TEXTS:
                eog.add(i)
                self._attr[i] |= Attr.CONTROL
        eog.update(roles[r] for r in ("eos", "eot", "eom") if r in roles)
        return eog

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.

        add_special: prepend BOS / append EOS when the vocabulary asks for them (`add_bos`,
        `add_eos`). parse_special: control tokens written in the text (e.g. `<|im_start|>`)
        become their ids; without it only user-defined tokens are recognised.
        """
        fragments = self._partition(text, parse_special) if text else []
        raw = iter(self._encode_raw([f for f in fragments if isinstance(f, str)]))
        ids: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: vocabulary asks for BOS but has no BOS token")
            ids.append(self.bos_id)
        for f in fragments:
            if isinstance(f, str):
                ids.extend(next(raw))
            else:
                ids.append(f)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path}: vocabulary asks for EOS but has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _encode_bpe(self, texts: list[str]) -> list[list[int]]:
        # One call per fragment rather than encode_batch: the batch call starts the library's
        # thread pool, after which every fork() of this process prints a warning.
        n = self.vocab_size
        out = []
        for t in texts:
            ids = self._engine.encode(t, add_special_tokens=False).ids
            out.append([i for i in ids if i < n])  # drop placeholder ids (see _build_bpe)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into raw-text pieces (str) and special token ids (int).

        Special tokens are tried longest first; each one splits every raw piece at all its
        occurrences. User-defined tokens always count; control and unknown tokens only with
        parse_special (llama.cpp's tokenizer_st_partition). Raw pieces are never empty.
        """
        fragments: list[str | int] = [text]
        for tid in self._specials:
            attr = self._attr[tid]
            if not parse_special and attr & (Attr.CONTROL | Attr.UNKNOWN):
                continue
            special = self._texts[tid]
            if special not in text:
                continue
            out: list[str | int] = []
            for f in fragments:
                if isinstance(f, int) or special not in f:
                    out.append(f)
                    continue
                parts = f.split(special)
                for k, part in enumerate(parts):
                    if k > 0:
                        out.append(tid)
                        if attr & Attr.RSTRIP:
                            part = part.lstrip(_C_SPACE)
                    if k < len(parts) - 1 and attr & Attr.LSTRIP:
                        part = part.rstrip(_C_SPACE)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    # -- decoding -------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token (llama.cpp's `llama_token_to_piece` with lstrip=0).

        Control and unknown tokens render as b"" unless `special`.
        """
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range (vocab size {self.vocab_size})")
        if not special and self._attr[token_id] & (Attr.CONTROL | Attr.UNKNOWN):
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id)
        return piece

    def _render(self, token_id: int) -> bytes:
        text, attr = self._texts[token_id], self._attr[token_id]
        if attr & (Attr.CONTROL | Attr.UNKNOWN | Attr.USER_DEFINED):
            return text.encode()
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode()
            return _byte_level_decode(text)
        if attr & Attr.BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""  # unused / undefined tokens render as nothing

    def decode(self, ids, special: bool = False) -> str:
        """Text of `ids`, as llama.cpp's `llama_detokenize(remove_special=False, unparse_special=special)`.

        That means: control tokens vanish unless `special`; with SentencePiece's space prefix
        the first token loses one leading space; BPE vocabularies with clean-up spaces get
        llama.cpp's " ." → "." style clean-up. Invalid UTF-8 becomes U+FFFD.
        """
        detok = self.detokenizer(special)
        return "".join(detok.add(i) for i in ids) + detok.finalize()

    def detokenizer(self, special: bool = False) -> StreamingDetokenizer:
        """A streaming decoder: feed ids one at a time, get text as soon as it is complete."""
        return StreamingDetokenizer(self, special)


def _byte_level_decode(text: str) -> bytes:
    """GPT-2 byte-level token text → bytes. llama.cpp spells unmappable characters out."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = _BYTE_OF_CHAR.get(c)
            if b is not None:
                out.append(b)
            else:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)


class StreamingDetokenizer:
    """Incremental `Tokenizer.decode`: `add(id)` returns the newly completed text.

    Bytes go through an incremental UTF-8 decoder, so an unfinished multi-byte character is
    held back until its last byte arrives; the space clean-up (when the vocabulary uses it)
    holds back the few characters whose fate depends on what follows. Each token costs O(its
    length), and the concatenation of everything returned equals `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._strip_space = tokenizer.add_space_prefix  # only the very first token's
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


class _SpaceCleaner:
    """llama.cpp's `clean_spaces` detokenizer passes, as streaming state machines.

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


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


def _build_bpe(path: str, texts: list[str], merges, pre: _PreTokenizer):
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

    if merges is None:
        raise GGUFError(path, "missing metadata key 'tokenizer.ggml.merges'")
    vocab = {t: i for i, t in enumerate(texts)}
    pairs = []
    for m in merges:
        # llama.cpp splits at the first space after the first character.
        cut = m.find(" ", 1)
        a, b = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
        # HF refuses merges of or into unknown tokens; llama.cpp could never emit those as one
        # token anyway, so dropping them only matters for malformed vocabularies.
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    # A character missing from the vocabulary stays a symbol of its own in llama.cpp, blocking
    # merges across it, and is dropped at the end. HF would drop it first and merge across the
    # gap, so missing byte characters get placeholder ids ≥ vocab size, filtered from the output.
    for c in _BYTE_OF_CHAR:
        vocab.setdefault(c, len(vocab))
    model = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _REGEXES[pre.regexes]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf


def _build_spm(path: str, texts: list[str], scores, attrs: list, unk_id, add_space_prefix: bool):
    import sentencepiece as spm

    if unk_id is None:
        raise GGUFError(path, "SentencePiece vocabulary without an unknown token")
    pieces = []
    for i, text in enumerate(texts):
        score = float(scores[i]) if scores is not None else 0.0
        # llama.cpp merges into any token whose text matches, whatever its type, and has cut
        # special tokens out beforehand; so everything but the byte and unk tokens is NORMAL.
        if i == unk_id:
            kind = _SP_UNKNOWN
        elif attrs[i] & Attr.BYTE and _BYTE_TOKEN.fullmatch(text):
            kind, text = _SP_BYTE, f"<0x{text[3:5].upper()}>"
        else:
            kind = _SP_NORMAL
        pieces.append(_pb_message(1, _pb_bytes(1, text.encode()) + _pb_float(2, score) + _pb_varint(3, kind)))
    trainer = _pb_varint(3, _SP_MODEL_BPE) + _pb_varint(4, len(texts))
    trainer += _pb_varint(35, 1)  # byte_fallback: characters without a token become <0xXX> tokens
    # llama.cpp does no normalisation and never collapses whitespace for SentencePiece
    # vocabularies (tokenizer.ggml.remove_extra_whitespaces is only honoured by its T5
    # tokenizer), so neither do we. The dummy prefix goes in front of every raw fragment, as in
    # llama.cpp, where each fragment is either the first one or follows a special token.
    normalizer = _pb_bytes(1, b"identity") + _pb_varint(3, int(add_space_prefix))
    normalizer += _pb_varint(4, 0) + _pb_varint(5, 1)  # remove_extra_whitespaces, escape_whitespaces
    proto = b"".join(pieces) + _pb_message(2, trainer) + _pb_message(3, normalizer)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


# A sentencepiece ModelProto is serialised by hand (field numbers from sentencepiece_model.proto)
# so that we do not depend on protobuf just to write a dozen fields.
_SP_NORMAL, _SP_UNKNOWN, _SP_BYTE = 1, 2, 6  # ModelProto.SentencePiece.Type
_SP_MODEL_BPE = 2  # TrainerSpec.ModelType


def _pb_varint_raw(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pb_varint(field: int, v: int) -> bytes:
    return _pb_varint_raw(field << 3) + _pb_varint_raw(v)


def _pb_float(field: int, v: float) -> bytes:
    return _pb_varint_raw(field << 3 | 5) + struct.pack("<f", v)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint_raw(field << 3 | 2) + _pb_varint_raw(len(data)) + data


_pb_message = _pb_bytes
