"""Special tokens, as llama.cpp's `llama-vocab.cpp` treats them.

Which token plays which role (BOS, EOS, end of turn, fill-in-the-middle …) when the metadata
does not say, which tokens end generation, the per-model attribute quirks, and how special
tokens are cut out of the text before the engine sees the rest (tokenizer_st_partition).
llama.cpp recognises many of them by their text (llama_vocab::impl::load); the tables below are
its lists. The functions that take `attrs` update it in place, as llama.cpp updates its
token attributes while it loads the vocabulary.
"""

from __future__ import annotations

import re

from .alphabet import Attr


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

# llama.cpp's role ids when the metadata names none (Falcon's ids for BPE), per tokenizer.ggml.model.
_DEFAULT_ROLES = {"gpt2": {"bos": 11, "eos": 11}, "llama": {"bos": 1, "eos": 2, "unk": 0}}

_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by llama.cpp's lstrip/rstrip around special tokens
_SPECIAL = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN  # what llama.cpp cuts out of text


def read_roles(metadata: dict, model: str, texts: list[str], attrs: list[int]) -> dict[str, int]:
    """Role → token id: llama.cpp's defaults, then the metadata's ids, then the texts for the rest."""
    n = len(texts)
    roles = {k: v for k, v in _DEFAULT_ROLES[model].items() if v < n}
    for key, role in _ROLE_KEYS:
        v = metadata.get(f"tokenizer.ggml.{key}")
        if v is not None:  # in range: `checks` refuses other ids (llama.cpp would ignore them)
            roles[role] = v
    _find_roles_by_text(roles, texts, attrs)
    return roles


def _find_roles_by_text(roles: dict, texts: list[str], attrs: list[int]) -> None:
    """Fill eot/eom/fim roles the metadata left out by token text, as llama.cpp does.

    With several candidates llama.cpp's pick follows its hash map's iteration order; we
    take the earliest text in the candidate list instead (e.g. <|eot_id|> over
    <|end_of_text|>, <|im_end|> over <|endoftext|>).
    """
    ids = {t: i for i, t in enumerate(texts) if t in _ROLE_CANDIDATES}
    for role, candidates in _ROLE_TEXTS.items():
        if role in roles:
            continue
        found = next((ids[t] for t in candidates if t in ids), None)
        if found is not None:
            roles[role] = found
            attrs[found] |= Attr.CONTROL


def eog_ids(roles: dict, texts: list[str], attrs: list[int]) -> set[int]:
    """Every end-of-generation id (llama.cpp's `llama_vocab_is_eog`); those found by text become CONTROL."""
    eog = {roles[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in roles}
    for i, text in enumerate(texts):
        if text in _EOG_TEXTS:
            eog.add(i)
            attrs[i] |= Attr.CONTROL
    eog.update(roles[r] for r in ("eos", "eot", "eom") if r in roles)
    return eog


def apply_quirks(metadata: dict, texts: list[str], attrs: list[int]) -> None:
    """llama.cpp's per-model attribute fixes, chosen by `general.name`.

    They read which tokens are special, so they come after the roles have forced theirs to CONTROL.
    """
    # Phi-3 strips whitespace to the right of most of its special tokens.
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        ids = {t: i for i, t in enumerate(texts) if t in ("</s>", "<unk>", "<s>", "<|endoftext|>")}
        for i in range(len(texts)):
            if attrs[i] & _SPECIAL:
                attrs[i] |= Attr.RSTRIP
        if "</s>" in ids:
            attrs[ids["</s>"]] |= Attr.RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in ids:
                attrs[ids[t]] &= ~Attr.RSTRIP


class SpecialTokens:
    """A vocabulary's special tokens, cut out of text as llama.cpp's tokenizer_st_partition does."""

    def __init__(self, texts: list[str], attrs: list[int]):
        self._texts, self._attr = texts, attrs
        # Special tokens are cut out of the text longest first (by UTF-8 length).
        self._ranked = sorted((i for i in range(len(texts)) if attrs[i] & _SPECIAL),
                              key=lambda i: -len(texts[i].encode()))
        self._finders: dict = {}  # parse_special → (regex, prefixes), see _finder

    def partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into raw-text pieces (str) and special token ids (int).

        llama.cpp's tokenizer_st_partition: special tokens are tried longest first (by UTF-8
        length); each one splits every raw piece at all its occurrences, leftmost first, the
        search resuming after each match (after the whitespace an RSTRIP token swallows).
        User-defined tokens always count; control and unknown tokens only with parse_special.
        Raw pieces are never empty.
        """
        fragments: list[str | int] = [text]
        for rank in self._occurring(text, parse_special):
            fragments = self._cut_out(fragments, self._ranked[rank])
        return fragments

    def _occurring(self, text: str, parse_special: bool) -> list[int]:
        """The ranks of the special tokens that occur in `text`, in llama.cpp's order.

        Only these are tried: one regex scan finds, at every position, the longest one starting
        there; the others starting there are its prefixes.
        """
        finder, prefixes = self._finder(parse_special)
        if finder is None:
            return []
        found = set()
        for longest in set(finder.findall(text)):
            found.update(prefixes[longest])
        return sorted(found)

    def _cut_out(self, fragments: list[str | int], tid: int) -> list[str | int]:
        """`fragments` with every occurrence of token `tid` in their raw text replaced by `tid`."""
        special, attr = self._texts[tid], self._attr[tid]
        n = len(special)
        out: list[str | int] = []
        for f in fragments:
            if isinstance(f, int) or special not in f:
                out.append(f)
                continue
            start, end = 0, len(f)
            while True:
                match = f.find(special, start, end)
                if match < 0:
                    if start < end:
                        out.append(f[start:end])
                    break
                left = match
                if attr & Attr.LSTRIP:
                    while left > start and f[left - 1] in _C_SPACE:
                        left -= 1
                if left > start:
                    out.append(f[start:left])
                out.append(tid)
                start = match + n
                if attr & Attr.RSTRIP:
                    while start < end and f[start] in _C_SPACE:
                        start += 1
        return out

    def _finder(self, parse_special: bool):
        """(regex finding the longest special token at each position, its prefixes' ranks), cached.

        Ranks index `self._ranked`; texts appearing twice keep the first (llama.cpp's sort is
        not stable, so which of two equal texts wins is unspecified there anyway).
        """
        cached = self._finders.get(parse_special)
        if cached is None:
            rank: dict[str, int] = {}
            for r, tid in enumerate(self._ranked):
                if parse_special or not self._attr[tid] & (Attr.CONTROL | Attr.UNKNOWN):
                    rank.setdefault(self._texts[tid], r)
            if not rank:
                cached = (None, None)
            else:
                # every special token that is a prefix of another one is found with it
                prefixes = {t: [rank[t[:k]] for k in range(1, len(t) + 1) if t[:k] in rank] for t in rank}
                # a lookahead finds overlapping occurrences; the trie makes it longest-first
                cached = (re.compile(f"(?=({_trie_regex(list(rank))}))", re.DOTALL), prefixes)
            self._finders[parse_special] = cached
        return cached


def _trie_regex(words: list[str]) -> str:
    """A regex matching any of `words` (non-empty), the longest where several match."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}  # end of a word

    def emit(node: dict) -> str:
        alts = [re.escape(c) + emit(child) for c, child in node.items() if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if "" in node:  # a word ends here: try the longer ones first
            return f"(?:{body})?" if len(alts) > 1 or len(body) > 1 else body + "?"
        return body

    return emit(trie)
