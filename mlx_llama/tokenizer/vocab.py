"""`Tokenizer`: one GGUF vocabulary, read from the metadata, encoding and decoding as llama.cpp.

Building it follows llama.cpp's `llama_vocab::impl::load`: the tokens and their attributes,
the settings (pre-tokenizer, BOS/EOS, space prefix), the special tokens' roles, the per-model
quirks, then the engine. Encoding cuts special tokens out of the text and hands the rest to
the engine; decoding renders each token's bytes.
"""

from __future__ import annotations

from ..errors import GGUFError
from .alphabet import BYTE_TOKEN, TYPE_TO_ATTR, Attr, byte_level_decode
from .checks import check_vocabulary
from .detokenize import StreamingDetokenizer, clean_spaces
from .engines import build_bpe, build_spm
from .pretokenizers import PRE_TOKENIZERS
from .specials import SpecialTokens, apply_quirks, eog_ids, read_roles


class Tokenizer:
    """Text ↔ token ids for one GGUF vocabulary, with llama.cpp's semantics.

    Attributes: `model` ("gpt2" or "llama"), `pre` (pre-tokenizer name, BPE only), `vocab_size`,
    `bos_id`, `eos_id`, `eot_id`, `eom_id`, `pad_id`, `unk_id` (None when absent), `add_bos`,
    `add_eos`, `stop_ids` (every end-of-generation id, llama.cpp's `llama_vocab_is_eog`),
    `metadata` (the file's metadata it was built from: chat templates read theirs there).
    """

    def __init__(self, path: str, metadata: dict):
        self.path = path
        self.metadata = metadata
        self._read_vocabulary(metadata)
        self._read_settings(metadata)
        self._read_roles(metadata)
        apply_quirks(metadata, self._texts, self._attr)  # after the roles, which force tokens to CONTROL
        self._specials = SpecialTokens(self._texts, self._attr)
        self._pieces: list[bytes | None] = [None] * self.vocab_size  # token_to_piece(special=True) cache
        self._engine = self._build_engine(metadata)

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """Build the tokenizer of a `GGUFFile` (anything with `.path` and `.metadata`)."""
        return cls(str(gguf_file.path), gguf_file.metadata)

    # -- building, step by step -----------------------------------------------------------------

    def _read_vocabulary(self, md: dict) -> None:
        """The vocabulary kind, and each token's text and attributes."""
        self.model = md.get("tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise GGUFError(self.path, f"unsupported tokenizer model {self.model!r} (supported: gpt2, llama)")
        check_vocabulary(self.path, md)
        tokens = md["tokenizer.ggml.tokens"]
        # llama.cpp renames empty tokens so that every text is unique and non-empty.
        self._texts: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab_size = len(self._texts)
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            self._attr = [Attr.NORMAL] * self.vocab_size
        else:
            self._attr = [TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types]

    def _read_settings(self, md: dict) -> None:
        """How text is cut and framed: the pre-tokenizer, BOS/EOS, the space prefix, the clean-up."""
        if self.model == "gpt2":
            # llama.cpp falls back to "default" (with a loud warning) when the key is missing.
            self.pre = md.get("tokenizer.ggml.pre") or "default"
            pre = PRE_TOKENIZERS.get(self.pre)
            if pre is None:
                raise GGUFError(self.path, f"unsupported tokenizer pre-tokenizer {self.pre!r}")
            self.clean_spaces = pre.clean_spaces  # detokenizer clean-up (" ." → ".")
            add_bos, add_space_prefix = pre.add_bos, False
        else:
            self.pre, self.clean_spaces = None, False
            add_bos, add_space_prefix = True, True
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        # SentencePiece's "▁" in front of the text; decoding drops one leading space again.
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

    def _read_roles(self, md: dict) -> None:
        """The special tokens' roles and the end-of-generation ids (forcing those tokens to CONTROL)."""
        roles = read_roles(md, self.model, self._texts, self._attr)
        self.bos_id, self.eos_id, self.unk_id = roles.get("bos"), roles.get("eos"), roles.get("unk")
        self.eot_id, self.eom_id, self.pad_id = roles.get("eot"), roles.get("eom"), roles.get("pad")
        self.stop_ids = eog_ids(roles, self._texts, self._attr)

    def _build_engine(self, md: dict):
        """The engine turning raw text (special tokens cut out) into ids: BPE or SentencePiece."""
        if self.model == "gpt2":
            return build_bpe(self.path, self._texts, md.get("tokenizer.ggml.merges"), PRE_TOKENIZERS[self.pre])
        return build_spm(self.path, self._texts, md.get("tokenizer.ggml.scores"), self._attr, self.unk_id,
                         self.add_space_prefix)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.

        add_special: prepend BOS / append EOS when the vocabulary asks for them (`add_bos`,
        `add_eos`). parse_special: control tokens written in the text (e.g. `<|im_start|>`)
        become their ids; without it only user-defined tokens are recognised.
        """
        fragments = self._specials.partition(text, parse_special) if text else []
        raw = iter(self._engine.encode([f for f in fragments if isinstance(f, str)]))
        ids: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise GGUFError(self.path, "vocabulary asks for BOS but has no BOS token")
            ids.append(self.bos_id)
        for f in fragments:
            if isinstance(f, str):
                ids.extend(next(raw))
            else:
                ids.append(f)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise GGUFError(self.path, "vocabulary asks for EOS but has no EOS token")
            ids.append(self.eos_id)
        return ids

    # -- decoding -------------------------------------------------------------------------------

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits of one token (`llama_token_get_attr`): `alphabet.Attr` flags."""
        return self._attr[token_id]

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
        """The bytes of one token as its kind spells them (uncached `token_to_piece(special=True)`)."""
        text, attr = self._texts[token_id], self._attr[token_id]
        if attr & (Attr.CONTROL | Attr.UNKNOWN | Attr.USER_DEFINED):
            return text.encode()
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode()
            return byte_level_decode(text)
        if attr & Attr.BYTE:
            m = BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""  # unused / undefined tokens render as nothing

    def decode(self, ids, special: bool = False) -> str:
        """Text of `ids`, as llama.cpp's `llama_detokenize(remove_special=False, unparse_special=special)`.

        That means: control tokens vanish unless `special`; with SentencePiece's space prefix
        the first token loses one leading space; BPE vocabularies with clean-up spaces get
        llama.cpp's " ." → "." style clean-up. Invalid UTF-8 becomes U+FFFD.
        """
        pieces = [self.token_to_piece(i, special) for i in ids]
        # llama.cpp drops one leading space of the first token, even when that token is BOS and
        # renders as nothing: then no space is dropped at all.
        if pieces and self.add_space_prefix and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        text = b"".join(pieces).decode("utf-8", "replace")
        return clean_spaces(text) if self.clean_spaces else text

    def detokenizer(self, special: bool = False, continuation: bool = False) -> StreamingDetokenizer:
        """A streaming decoder: feed ids one at a time, get text as soon as it is complete.

        continuation: the ids continue earlier text (generated after a prompt), so the first
        token keeps its SentencePiece space, as in llama.cpp's printed output (each token's
        `token_to_piece`); by default the pieces concatenate to `decode(ids)`.
        """
        return StreamingDetokenizer(self, special, continuation)
