"""A Hugging Face model directory's tokenizer files → GGUF tokenizer metadata (`tokenizer.ggml.*`,
`tokenizer.chat_template`), as llama.cpp's converter writes it: what `mlx_llama.Tokenizer` reads.

Two vocabulary kinds, as in `vocab_to_hf`:

    gpt2   byte-level BPE from tokenizer.json: tokens, merges, and the pre-tokenizer recognised
           from its regexes (`tokenizer.ggml.pre`, the name llama.cpp gives that regex chain)
    llama  SentencePiece BPE: from tokenizer.model (pieces, scores and types, as llama.cpp reads
           them) when there is one, else from a tokenizer.json with byte fallback, scores ranked
           by its merges

Added tokens are control tokens when special, user-defined otherwise; the special tokens' roles
and BOS/EOS come from tokenizer_config.json (then the post-processor, then config.json).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from ..errors import MlxLlamaError
from ..tokenizer.alphabet import BYTE_TOKEN
from ..tokenizer.pretokenizers import PRE_TOKENIZERS, REGEXES
from .vocab_to_hf import ROLE_KEYS, SPM_SPACE

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF (and SentencePiece) token types
# The case-insensitive contractions as Hugging Face spells them, and as llama.cpp (pretokenizers.py)
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA_CPP_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = REGEXES["gpt2"][0]  # what ByteLevel(use_regex=True) splits with


class VocabError(MlxLlamaError):
    """A tokenizer the conversion cannot carry over (one line, naming the directory)."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


def gguf_vocab(directory, vocab_size: int | None = None, model_config: dict | None = None) -> dict:
    """The GGUF tokenizer metadata of `directory` (tokenizer.json / tokenizer.model,
    tokenizer_config.json); `vocab_size`: the model's, padded with unused tokens as llama.cpp does."""
    d = Path(directory)
    tok_json = _read_json(d / "tokenizer.json")
    tok_config = _read_json(d / "tokenizer_config.json") or {}
    kind = (tok_json or {}).get("model", {})
    if (d / "tokenizer.model").exists() and not _is_byte_level(tok_json):
        md = _from_sentencepiece(d, tok_json)
    elif kind.get("type") == "BPE" and kind.get("byte_fallback"):
        md = _from_spm_json(d, tok_json)
    elif kind.get("type") == "BPE" and _is_byte_level(tok_json):
        md = _from_byte_level_json(d, tok_json, tok_config)
    elif tok_json is None:
        raise VocabError(d, "no tokenizer.json or tokenizer.model")
    else:
        raise VocabError(d, f"unsupported tokenizer ({kind.get('type')} model; supported: byte-level BPE, "
                            "SentencePiece BPE)")
    _pad(d, md, vocab_size)
    _roles(d, md, tok_json, tok_config, model_config or {})
    _chat_templates(d, md, tok_config)
    return md


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise VocabError(path, f"cannot be read as JSON ({e})") from None


def _is_byte_level(tok_json) -> bool:
    return bool(tok_json) and (tok_json.get("decoder") or {}).get("type") == "ByteLevel"


def _by_id(d: Path, tok_json: dict) -> tuple[list[str], dict[int, dict]]:
    """Token texts by id (model vocabulary and added tokens) and the added tokens by id."""
    vocab = dict(tok_json["model"]["vocab"])
    added = {int(t["id"]): t for t in tok_json.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    n = max(vocab.values(), default=-1) + 1
    texts = [None] * n
    for text, i in vocab.items():
        texts[i] = text
    if None in texts:
        raise VocabError(d / "tokenizer.json", f"token id {texts.index(None)} has no text (ids must run 0..{n - 1})")
    return texts, added


def _added_type(token: dict) -> int:
    return CONTROL if token.get("special") else USER_DEFINED


# -- byte-level BPE ------------------------------------------------------------------------------


def _from_byte_level_json(d: Path, tok_json: dict, tok_config: dict) -> dict:
    texts, added = _by_id(d, tok_json)
    types = [_added_type(added[i]) if i in added else NORMAL for i in range(len(texts))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(d, tok_json, tok_config),
            "tokenizer.ggml.tokens": texts, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def _pre_name(d: Path, tok_json: dict, tok_config: dict) -> str:
    """llama.cpp's name for the pre-tokenizer's regex chain (the settings of that name agree
    with the file's: merges ignored or not, spaces cleaned up or not)."""
    regexes = _split_regexes(d, tok_json.get("pre_tokenizer"))
    key = next((k for k, v in REGEXES.items() if v == regexes), None)
    if key is None:
        raise VocabError(d / "tokenizer.json", f"unsupported pre-tokenizer: regexes {regexes!r} match none llama.cpp knows")
    names = [n for n, p in PRE_TOKENIZERS.items() if p.regexes == key]
    ignore = bool(tok_json["model"].get("ignore_merges"))
    clean = tok_config.get("clean_up_tokenization_spaces")
    for wanted in ((ignore, clean), (ignore, None), (None, None)):
        for n in names:
            p = PRE_TOKENIZERS[n]
            if wanted[0] in (None, p.ignore_merges) and wanted[1] in (None, p.clean_spaces):
                return n
    return names[0]


def _split_regexes(d: Path, pre: dict | None) -> list[str]:
    """The regexes a pre-tokenizer splits with, one after the other, in llama.cpp's spelling."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            out.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        elif kind == "Digits" and step.get("individual_digits"):
            out.append(r"\p{N}")
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                out.append(_GPT2)
        else:
            raise VocabError(d / "tokenizer.json", f"unsupported pre-tokenizer step {json.dumps(step)[:80]}")
    return [r.replace(_HF_CONTRACTIONS, _LLAMA_CPP_CONTRACTIONS) for r in out]


# -- SentencePiece -------------------------------------------------------------------------------


def _from_sentencepiece(d: Path, tok_json: dict | None) -> dict:
    """tokenizer.model as llama.cpp reads it, the added tokens of tokenizer.json on top."""
    pieces, bpe, dummy_prefix = read_sentencepiece(d / "tokenizer.model")
    if not bpe:
        raise VocabError(d / "tokenizer.model", "a SentencePiece unigram model: not supported (BPE only)")
    texts, scores, types = (list(x) for x in zip(*pieces))
    for i, token in ((int(t["id"]), t) for t in (tok_json or {}).get("added_tokens", [])):
        if i >= len(texts):
            texts += [f"[PAD{j}]" for j in range(len(texts), i + 1)]
            scores += [-1000.0] * (i + 1 - len(scores))
            types += [UNUSED] * (i + 1 - len(types))
        if types[i] in (NORMAL, UNUSED) or texts[i] != token["content"]:
            texts[i], scores[i], types[i] = token["content"], -1000.0, _added_type(token)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": texts,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": dummy_prefix}


def _from_spm_json(d: Path, tok_json: dict) -> dict:
    """A SentencePiece-style tokenizer.json (BPE, byte fallback): a piece's score is minus the
    rank of the first merge that makes it, so llama.cpp merges in the file's order."""
    texts, added = _by_id(d, tok_json)
    model = tok_json["model"]
    rank = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    unreachable = -float(len(rank) + 1)  # pieces no merge makes: last, should llama.cpp try them
    scores = [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else unreachable) for t in texts]
    unk = model.get("unk_token")
    types = []
    for i, t in enumerate(texts):
        types.append(_added_type(added[i]) if i in added and t != unk else UNKNOWN if t == unk
                     else BYTE if BYTE_TOKEN.fullmatch(t) else NORMAL)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": texts,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": _space_prefix(tok_json)}


def _space_prefix(tok_json: dict) -> bool:
    """Whether a "▁" goes in front of the text: a Prepend normalizer or a prepending Metaspace."""
    def steps(node, key):
        if not node:
            return []
        return node.get(key, []) if node.get("type") == "Sequence" else [node]

    for step in steps(tok_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == SPM_SPACE:
            return True
    for step in steps(tok_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def read_sentencepiece(path: Path) -> tuple[list[tuple[str, float, int]], bool, bool]:
    """(pieces as (text, score, type), BPE model?, add_dummy_prefix) of a SentencePiece ModelProto,
    read field by field (sentencepiece_model.proto's numbers) so that no protobuf is needed."""
    try:
        data = path.read_bytes()
        pieces, trainer, normalizer = [], {}, {}
        for field, value in _proto_fields(data):
            if field == 1:
                p = dict(_proto_fields(value))
                score = struct.unpack("<f", p.get(2, b"\0\0\0\0"))[0]
                pieces.append((p.get(1, b"").decode(), score, p.get(3, NORMAL)))
            elif field == 2:
                trainer = dict(_proto_fields(value))
            elif field == 3:
                normalizer = dict(_proto_fields(value))
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise VocabError(path, f"not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not pieces:
        raise VocabError(path, "not a SentencePiece model (no pieces)")
    return pieces, trainer.get(3, 1) == 2, bool(normalizer.get(3, 1))  # model_type 2 = BPE; add_dummy_prefix


def _proto_fields(data: bytes):
    """(field number, value) of each field of a serialised protobuf message: varints as ints,
    length-delimited fields as bytes, 32-bit fields as their 4 bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            n, pos = _varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"wire type {wire} at byte {pos}")
        if pos > len(data):
            raise ValueError("truncated")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


# -- the rest of the metadata --------------------------------------------------------------------


def _pad(d: Path, md: dict, vocab_size: int | None) -> None:
    """llama.cpp's padding of a vocabulary shorter than the model's embedding table."""
    n = len(md["tokenizer.ggml.tokens"])
    if vocab_size is None or vocab_size == n:
        return
    if vocab_size < n:
        raise VocabError(d, f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    md["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(n, vocab_size)]
    md["tokenizer.ggml.token_type"] += [UNUSED] * (vocab_size - n)
    if "tokenizer.ggml.scores" in md:
        md["tokenizer.ggml.scores"] += [-1000.0] * (vocab_size - n)


def _roles(d: Path, md: dict, tok_json, tok_config: dict, model_config: dict) -> None:
    """Special token ids and BOS/EOS framing: tokenizer_config.json first, then tokenizer.json's
    post-processor and config.json (llama.cpp's SpecialVocab order)."""
    ids = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    for key, role in ROLE_KEYS.items():
        value = tok_config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        token_id = ids.get(text) if isinstance(text, str) else None
        if token_id is None:
            from_config = model_config.get(f"{role}_token_id")
            token_id = from_config[0] if isinstance(from_config, list) and from_config else from_config
        if isinstance(token_id, int) and 0 <= token_id < len(ids):
            md[f"tokenizer.ggml.{names[role]}"] = token_id
    framing = _post_processor_adds(tok_json)
    for role in ("bos", "eos"):
        add = tok_config.get(f"add_{role}_token", framing.get(role))
        if add is not None:
            md[f"tokenizer.ggml.add_{role}_token"] = bool(add)


def _post_processor_adds(tok_json) -> dict[str, bool]:
    """Whether tokenizer.json's TemplateProcessing puts a token before / after a single sequence."""
    post = (tok_json or {}).get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            return {"bos": bool(single) and "SpecialToken" in single[0], "eos": bool(single) and "SpecialToken" in single[-1]}
    return {}


def _chat_templates(d: Path, md: dict, tok_config: dict) -> None:
    """tokenizer_config.json's chat_template (a string, or transformers' list of named ones), or
    chat_template.jinja (where transformers 5 saves it)."""
    template = tok_config.get("chat_template")
    jinja = d / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):
        named = [t.get("name") for t in template if t.get("name") != "default"]
        for t in template:
            key = "tokenizer.chat_template" if t.get("name") == "default" else f"tokenizer.chat_template.{t.get('name')}"
            md[key] = t.get("template")
        if named:  # llama.cpp's converter lists the named ones
            md["tokenizer.chat_templates"] = named
    elif isinstance(template, str):
        md["tokenizer.chat_template"] = template
