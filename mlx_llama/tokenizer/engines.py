"""The engines: raw text (special tokens already cut out) → token ids.

Both have one method, `encode(texts) -> ids per text`, and are built from the GGUF vocabulary
alone: byte-level BPE runs Hugging Face's `tokenizers` BPE model on the words the pre-tokenizer
cuts out, SentencePiece runs a `sentencepiece` processor loaded from a ModelProto written here
from the tokens, scores and token types.
"""

from __future__ import annotations

import re
import struct
from itertools import chain

from ..errors import GGUFError
from .alphabet import BYTE_LEVEL, BYTE_OF_CHAR, BYTE_TOKEN, Attr
from .pretokenizers import REGEXES, PreTokenizer, python_regex

# --------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizer.ggml.model = gpt2)
# --------------------------------------------------------------------------------------------


def build_bpe(path: str, texts: list[str], merges, pre: PreTokenizer) -> BPE:
    """The BPE engine of a vocabulary: its token texts, `tokenizer.ggml.merges` and pre-tokenizer."""
    from tokenizers import models

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
    for c in BYTE_OF_CHAR:
        vocab.setdefault(c, len(vocab))
    model = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)
    return BPE(model, REGEXES[pre.regexes], len(texts))


_WORD_CACHE_SIZE = 1 << 17


class BPE:
    """Byte-level BPE as llama.cpp runs it (llm_tokenizer_bpe_session).

    The text is cut into words by the pre-tokenizer's regex chain (Python's `re`); each word's
    UTF-8 bytes, spelled in GPT-2's byte alphabet, are merged by HF's BPE model (lowest rank
    first, leftmost on ties, as llama.cpp). Words repeat a lot in text, so their ids are cached.
    """

    def __init__(self, model, regexes: list[str], n_vocab: int):
        self._model = model
        # the capturing group makes re.split return the matches as well as the text between them
        self._splits = [re.compile(f"({python_regex(r)})").split for r in regexes]
        self._n_vocab = n_vocab
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of `text` (non-empty, in order, concatenating to `text`)."""
        words = [text]
        for split in self._splits:
            words = [w for piece in words for w in split(piece) if w]
        return words

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each of `texts`."""
        cache = self._cache
        if len(cache) > _WORD_CACHE_SIZE:
            self._cache = cache = {}  # a new dict: another thread may still be reading the old one
        get, merge = cache.get, self._merge
        out = []
        for text in texts:
            ids = [get(w) or merge(w) for w in self.words(text)]
            out.append(list(chain.from_iterable(ids)))
        return out

    def _merge(self, word: str) -> list[int]:
        chars = word.encode().decode("latin-1").translate(BYTE_LEVEL)
        n = self._n_vocab
        ids = self._cache[word] = [t.id for t in self._model.tokenize(chars) if t.id < n]  # no placeholders
        return ids


# --------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.ggml.model = llama)
# --------------------------------------------------------------------------------------------


def build_spm(path: str, texts: list[str], scores, attrs: list, unk_id, add_space_prefix: bool) -> SentencePiece:
    """The SentencePiece engine of a vocabulary: its token texts, scores and attributes."""
    import sentencepiece as spm

    if unk_id is None:
        raise GGUFError(path, "SentencePiece vocabulary without an unknown token")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(_model_proto(texts, scores, attrs, unk_id, add_space_prefix))
    return SentencePiece(sp)


class SentencePiece:
    """A `sentencepiece` processor behind the engines' `encode(texts)`."""

    def __init__(self, processor):
        self._sp = processor

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each of `texts`."""
        # one call per text: a list argument goes through sentencepiece's thread pool
        return [self._sp.EncodeAsIds(t) for t in texts]


def _model_proto(texts: list[str], scores, attrs: list, unk_id: int, add_space_prefix: bool) -> bytes:
    """A serialised sentencepiece ModelProto: BPE over `texts`, normalising nothing, as llama.cpp."""
    pieces = []
    for i, text in enumerate(texts):
        score = float(scores[i]) if scores is not None else 0.0
        # llama.cpp merges into any token whose text matches, whatever its type, and has cut
        # special tokens out beforehand; so everything but the byte and unk tokens is NORMAL.
        if i == unk_id:
            kind = _SP_UNKNOWN
        elif attrs[i] & Attr.BYTE and BYTE_TOKEN.fullmatch(text):
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
    return b"".join(pieces) + _pb_message(2, trainer) + _pb_message(3, normalizer)


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
