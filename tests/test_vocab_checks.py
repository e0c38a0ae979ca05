"""A damaged vocabulary is one `GGUFError` naming the key, before any engine is built: arrays of
the wrong length or item type, special-token ids out of range or of the wrong type, duplicate
tokens, missing or broken byte tokens, unknown `tokenizer.ggml.*` keys (sentencepiece raised
RuntimeError, Python IndexError or TypeError on several of these)."""

from __future__ import annotations

import math

import pytest

from make_fixture import make_tiny_vocab
from mlx_llama.errors import GGUFError
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.tokenizer import Tokenizer

K = "tokenizer.ggml."


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> dict:
    """The metadata of the tiny SentencePiece vocabulary the fuzz test uses, as the reader returns it."""
    return GGUFFile(make_tiny_vocab(tmp_path_factory.mktemp("vocab") / "tiny.gguf")).metadata


def changed(md: dict, **changes) -> dict:
    """A copy of `md` with tokenizer.ggml.<key> set (None: dropped)."""
    out = dict(md)
    for key, value in changes.items():
        name = key if "." in key else K + key
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def edit(items: list, i: int, value) -> list:
    items = list(items)
    items[i] = value
    return items


def byte_id(md: dict, byte: int) -> int:
    return md[K + "tokens"].index(f"<0x{byte:02X}>")


# (case, function of the good metadata → damaged metadata, expected message fragment)
CASES = [
    ("token_type one short", lambda md: changed(md, token_type=md[K + "token_type"][:-1]),
     "'tokenizer.ggml.token_type' has {n1} items but tokenizer.ggml.tokens has {n}"),
    ("scores one long", lambda md: changed(md, scores=md[K + "scores"] + [0.0]),
     "'tokenizer.ggml.scores' has {n+1} items but tokenizer.ggml.tokens has {n}"),
    ("scores as strings", lambda md: changed(md, scores=[str(s) for s in md[K + "scores"]]),
     "'tokenizer.ggml.scores' holds str items, expected float"),
    ("scores as int32", lambda md: changed(md, scores=[int(s) for s in md[K + "scores"]]),
     "'tokenizer.ggml.scores' holds int items, expected float"),
    ("a NaN score", lambda md: changed(md, scores=edit(md[K + "scores"], 300, math.nan)),
     "'tokenizer.ggml.scores': item 300 is nan (must be finite)"),
    ("token types as floats", lambda md: changed(md, token_type=[float(t) for t in md[K + "token_type"]]),
     "'tokenizer.ggml.token_type' holds float items, expected int"),
    ("tokens as ints", lambda md: changed(md, tokens=list(range(len(md[K + "tokens"])))),
     "'tokenizer.ggml.tokens' holds int items, expected str"),
    ("tokens a string", lambda md: changed(md, tokens="abc"), "'tokenizer.ggml.tokens' has type str, expected an array of str"),
    ("no tokens", lambda md: changed(md, tokens=[], token_type=[], scores=[]), "'tokenizer.ggml.tokens' is empty"),
    ("bos id a string", lambda md: changed(md, bos_token_id="1"), "'tokenizer.ggml.bos_token_id' has type str, expected int"),
    ("eos id an array", lambda md: changed(md, eos_token_id=[2]), "'tokenizer.ggml.eos_token_id' has type list, expected int"),
    ("unk id a bool", lambda md: changed(md, unknown_token_id=True), "'tokenizer.ggml.unknown_token_id' has type bool"),
    ("eos id past the end", lambda md: changed(md, eos_token_id=len(md[K + "tokens"])),
     "'tokenizer.ggml.eos_token_id' = {n} is not a token id (the vocabulary has {n} tokens)"),
    ("padding id negative", lambda md: changed(md, padding_token_id=-1), "'tokenizer.ggml.padding_token_id' = -1 is not a token id"),
    ("add_bos a string", lambda md: changed(md, add_bos_token="false"), "'tokenizer.ggml.add_bos_token' has type str, expected bool"),
    ("add_eos an int", lambda md: changed(md, add_eos_token=0), "'tokenizer.ggml.add_eos_token' has type int, expected bool"),
    ("template an int", lambda md: changed(md, **{"tokenizer.chat_template": 7}), "'tokenizer.chat_template' has type int, expected str"),
    ("unknown key", lambda md: changed(md, scorez=[0.0]), "'tokenizer.ggml.scorez' is not a tokenizer key mlx_llama knows"),
    ("duplicate token", lambda md: changed(md, tokens=edit(md[K + "tokens"], 400, md[K + "tokens"][300])),
     "'tokenizer.ggml.tokens': tokens 300 and 400 are both"),
    ("byte token retyped", lambda md: changed(md, token_type=edit(md[K + "token_type"], byte_id(md, 0x41), 1)),
     "byte fallback needs the 256 byte tokens <0x00>…<0xFF> (type BYTE); 1 are missing, <0x41> first"),
    ("byte token renamed", lambda md: changed(md, tokens=edit(md[K + "tokens"], byte_id(md, 0x0A), "<0xZZ>")),
     "token {b} '<0xZZ>' is typed BYTE but is not a byte token <0xXX>"),
    ("byte token twice", lambda md: changed(md, tokens=edit(md[K + "tokens"], byte_id(md, 0x0B), "<0x0a>")),
     "tokens {a} and {b1} are both byte 0x0A"),
    ("no token types", lambda md: changed(md, token_type=None), "missing metadata key 'tokenizer.ggml.token_type'"),
]


@pytest.mark.parametrize("case,damage,expected", CASES, ids=[c[0] for c in CASES])
def test_damaged_vocabulary_is_one_error_naming_the_key(vocab, case, damage, expected):
    n = len(vocab[K + "tokens"])
    a, b = byte_id(vocab, 0x0A), byte_id(vocab, 0x0A)
    expected = expected.format(n=n, n1=n - 1, **{"n+1": n + 1}, b=b, a=a, b1=b + 1)
    with pytest.raises(GGUFError) as e:
        Tokenizer("tiny.gguf", damage(vocab))
    message = str(e.value)
    assert message.startswith("tiny.gguf: ") and "\n" not in message
    assert expected in message, message


def test_the_undamaged_vocabulary_tokenizes(vocab):
    tok = Tokenizer("tiny.gguf", vocab)
    ids = tok.encode("the cat\n")
    assert ids[0] == 1 and tok.decode(ids[1:]) == "the cat\n"  # "\n" through its byte token
    assert tok.encode("<|im_end|>", parse_special=True) == [1, len(vocab[K + "tokens"]) - 1]


def test_damaged_vocabulary_in_a_file(vocab, tmp_path, tiny_gguf):
    """Through the file and the loader: the error comes before the weights are decoded."""
    from test_tokenizer import write_vocab_gguf

    import mlx_llama

    good = GGUFFile(make_tiny_vocab(tmp_path / "v.gguf"))
    bad = write_vocab_gguf(tmp_path / "bad.gguf", good, {K + "token_type": vocab[K + "token_type"][:-3]})
    path = tiny_gguf({"default": "Q4_1"}, vocab_from=bad)
    with pytest.raises(GGUFError, match="'tokenizer.ggml.token_type' has"):
        mlx_llama.load(path)
