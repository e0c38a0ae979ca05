"""GGUF tokenizer metadata → Hugging Face's tokenizer files: `tokenizer.json` (a `tokenizers`
pipeline) and `tokenizer_config.json` (special tokens, BOS/EOS, chat template).

The pipeline encodes as llama.cpp does for the same vocabulary:

    gpt2   byte-level BPE: the pre-tokenizer's regex chain (`tokenizer.ggml.pre`) as Split steps,
           then GPT-2's byte alphabet; the file's merges, in order
    llama  SentencePiece BPE: spaces become "▁" (one in front of each text fragment with the
           space prefix), byte fallback; merges ranked by the merged piece's score, as Hugging
           Face's own SentencePiece converter ranks them

Control, unknown and user-defined tokens become added tokens (special unless user-defined), as
llama.cpp cuts them out of text before the engine sees it; BOS/EOS framing is the post-processor.
`vocab_from_hf` reads these files back into the same metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tokenizer.alphabet import TYPE_TO_ATTR, Attr
from ..tokenizer.pretokenizers import PRE_TOKENIZERS, REGEXES
from ..tokenizer.specials import read_roles

# tokenizer_config.json keys ↔ the GGUF roles whose token texts they name
ROLE_KEYS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unk", "pad_token": "pad"}
SPM_SPACE = "\u2581"  # "▁"


def hf_tokenizer(metadata: dict):
    """The `tokenizers.Tokenizer` of a GGUF vocabulary (`tokenizer.ggml.model` gpt2 or llama)."""
    from tokenizers import AddedToken, Tokenizer

    texts, attrs = _tokens(metadata)
    roles = read_roles(metadata, metadata["tokenizer.ggml.model"], texts, list(attrs))  # the file's types kept
    if metadata["tokenizer.ggml.model"] == "gpt2":
        tok = Tokenizer(_bpe_model(metadata, texts))
        _byte_level_pipeline(tok, metadata)
    else:
        tok = Tokenizer(_spm_model(metadata, texts, attrs, roles))
        _sentencepiece_pipeline(tok, metadata)
    # What llama.cpp cuts out of text before the engine: user-defined tokens always (HF: added
    # tokens), control and unknown ones when parsing specials (HF: special added tokens); a
    # normal token with a role (BOS, EOS …) is special in HF too. Existing texts keep their ids.
    roles_ids = set(roles.values())
    user = [i for i, a in enumerate(attrs) if a & Attr.USER_DEFINED]
    special = [i for i, a in enumerate(attrs) if a & (Attr.CONTROL | Attr.UNKNOWN) or (a == Attr.NORMAL and i in roles_ids)]
    tok.add_tokens([AddedToken(texts[i], special=False, normalized=False) for i in user])
    tok.add_special_tokens([AddedToken(texts[i], special=True, normalized=False) for i in special])
    _framing(tok, metadata, texts, roles)
    return tok


def _tokens(metadata: dict) -> tuple[list[str], list[int]]:
    """Token texts (llama.cpp's name for empty ones) and attributes, from the file's token types."""
    texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(metadata["tokenizer.ggml.tokens"])]
    types = metadata.get("tokenizer.ggml.token_type")
    attrs = [Attr.NORMAL] * len(texts) if types is None else [TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types]
    return texts, attrs


def _bpe_model(metadata: dict, texts: list[str]):
    from tokenizers import models

    pre = PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre") or "default"]
    merges = []
    for m in metadata["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut > 0:
            merges.append((m[:cut], m[cut + 1:]))
    vocab = {t: i for i, t in enumerate(texts)}
    return models.BPE(vocab, merges, ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)


def _byte_level_pipeline(tok, metadata: dict) -> None:
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre") or "default"]
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in REGEXES[pre.regexes]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()


def _spm_model(metadata: dict, texts: list[str], attrs: list[int], roles: dict):
    from tokenizers import models

    if "unk" not in roles:
        raise ValueError("SentencePiece vocabulary without an unknown token")
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(texts)
    # Hugging Face's ranking (convert_slow_tokenizer): every split of a normal piece into two
    # normal pieces is a merge, ranked by the merged piece's score, then its id.
    normal = {t: (float(scores[i]), i) for i, t in enumerate(texts) if attrs[i] == Attr.NORMAL}
    ranked = sorted((-score, i, t[:k], t[k:]) for t, (score, i) in normal.items()
                    for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal)
    vocab = {t: i for i, t in enumerate(texts)}
    return models.BPE(vocab, [(a, b) for _, _, a, b in ranked], unk_token=texts[roles["unk"]], fuse_unk=True,
                      byte_fallback=True)


def _sentencepiece_pipeline(tok, metadata: dict) -> None:
    from tokenizers import decoders, normalizers

    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # Prepend runs on each text fragment between added tokens, as llama.cpp's space prefix does
    steps = ([normalizers.Prepend(SPM_SPACE)] if prefix else []) + [normalizers.Replace(" ", SPM_SPACE)]
    tok.normalizer = normalizers.Sequence(steps)
    tail = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *tail])


def _framing(tok, metadata: dict, texts: list[str], roles: dict) -> None:
    """BOS/EOS around each sequence, as the file's add_bos/add_eos ask."""
    from tokenizers import processors

    model = metadata["tokenizer.ggml.model"]
    bos, eos = _adds(metadata, model)
    if not bos and not eos:
        tok.post_processor = processors.ByteLevel(trim_offsets=False) if model == "gpt2" else None
        return
    specials = []
    single, pair = "$A:0", "$A:0 $B:1"
    if bos:
        b = texts[roles["bos"]]
        single, pair = f"{b}:0 {single}", f"{b}:0 $A:0 {b}:1 $B:1"
        specials.append((b, roles["bos"]))
    if eos:
        e = texts[roles["eos"]]
        single, pair = f"{single} {e}:0", pair.replace("$A:0", f"$A:0 {e}:0") + f" {e}:1"
        specials.append((e, roles["eos"]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _adds(metadata: dict, model: str) -> tuple[bool, bool]:
    """(add BOS, add EOS), with llama.cpp's defaults when the file does not say."""
    default_bos = PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre") or "default"].add_bos if model == "gpt2" else True
    return (bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
            bool(metadata.get("tokenizer.ggml.add_eos_token", False)))


def tokenizer_config(metadata: dict, context_length: int) -> dict:
    """tokenizer_config.json: the special tokens by text, BOS/EOS, clean-up, chat template(s)."""
    texts, attrs = _tokens(metadata)
    model = metadata["tokenizer.ggml.model"]
    roles = read_roles(metadata, model, texts, attrs)
    add_bos, add_eos = _adds(metadata, model)
    clean = model == "gpt2" and PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre") or "default"].clean_spaces
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "clean_up_tokenization_spaces": clean, "model_max_length": context_length}
    config.update({key: texts[roles[role]] for key, role in ROLE_KEYS.items() if role in roles})
    named = {k[len("tokenizer.chat_template."):]: v for k, v in metadata.items() if k.startswith("tokenizer.chat_template.")}
    template = metadata.get("tokenizer.chat_template")
    if named:  # transformers' list form: the default one and the named ones
        config["chat_template"] = ([{"name": "default", "template": template}] if template else []) + \
            [{"name": n, "template": t} for n, t in named.items()]
    elif template:
        config["chat_template"] = template
    return config


def write_tokenizer_files(metadata: dict, out_dir, context_length: int) -> None:
    """tokenizer.json and tokenizer_config.json of a GGUF vocabulary, into `out_dir`."""
    out = Path(out_dir)
    hf_tokenizer(metadata).save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as fh:
        json.dump(tokenizer_config(metadata, context_length), fh, indent=2, ensure_ascii=False)
