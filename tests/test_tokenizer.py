"""mlx_llama.tokenizer against llama.cpp.

* SmolLM2 (the default model): differential tests against llama.cpp itself (llama-cpp-python's
  bindings, vocab only) on a few hundred generated strings, for encode with every
  add_special/parse_special combination, decode, token_to_piece and the special token ids.
* llama.cpp's own tokenizer test files (models/ggml-vocab-*.gguf + .inp/.out, fetched into
  tests/.cache/vocab/ by scripts/fetch_vocab_tests.sh) for every vocabulary we support, plus
  a differential run on a few of those vocabularies (SentencePiece included).
* Special tokens: every token's attributes, the role ids and BOS/EOS flags as llama.cpp has
  them; overlapping special tokens (appended to a vocabulary written to a new GGUF) cut out
  longest first; `</s>` in a raw SPM prompt.
* The streaming detokenizer: linear time, whole characters, continuation after a prompt.

The large differential run (thousands of strings per vocabulary) is tests/test_tokenizer_differential.py.
"""

from __future__ import annotations

import ctypes
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_llama.gguf_file import GGUFError, GGUFFile
from mlx_llama.tokenizer import Tokenizer

from mlx_llama import MlxLlamaError
from resources import vocab_dir

# llama.cpp test vocabularies whose tokenizer we implement (tokenizer.ggml.model gpt2 or llama).
SUPPORTED_VOCAB_TESTS = [
    "llama-spm", "phi-3",  # SentencePiece
    "gpt-2", "mpt", "starcoder", "refact", "command-r", "falcon", "llama-bpe",
    "qwen2", "qwen35", "deepseek-coder", "deepseek-llm",
]
# One per pre-tokenizer family, for the (slower) differential run against llama.cpp.
DIFFERENTIAL_VOCABS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2"]

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM.<|im_end|>\n"
    "<|im_start|>user\nWhat's 2+2? Answer in one word 🙂<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "     \t\n\r", "éèêëàâäôöûüçñßøåæœÉÀ",
    "日本語中文字漢字テキストカタカナひらがな한국어", "αβγδεζηθλΩπσ", "привет мир ёЖ",
    "🎉🙂👍🏽❤️‍🔥🇩🇪👨‍👩‍👧", "\u00a0\u2009\u3000\u200b\u2028\u0085\u1680",
    "١٢٣४५६½²³", "ـ़ؑ́̃̈", "\x00\x01\x7f\x1b",
]
_WORDS = [
    "the", " The", "'s", "'RE", "I'm", "don't", "we'll", " ", "  ", "    ", "\n", "\n\n", " \n ",
    "\t", "\r\n", "12345678", "3.14159", "1,000,000", "0x1F", "https://example.org/a?b=1&c=2",
    "def f(x):\n    return x**2\n", "if (a && b) { c++; }", "<div class=\"x\">", "naïve café",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_start|>", "<|", "|>",
    "<|im_start|>user", "<<|im_end|>>", "<|IM_START|>", "<reponame>", "<file_sep>", "<s>", "</s>",
    "<unk>", "▁", "<0x0A>", "Ġ", "Ċ", "你好，世界！", "こんにちは", "😀😃", "e\u0301", "ﬁ",
]


def generated_strings(n: int = 300, seed: int = 1234) -> list[str]:
    """Deterministic mix of words, look-alikes of special tokens and random runs of many scripts."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "a", CHAT, "Hello world", " Hello world", "<|im_start|><|im_end|>",
           "<|im_start|> user", "x<|im_end|>\n\n<|im_start|>", "   leading and trailing   "]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.4:
                parts.append(rng.choice(_WORDS))
            elif r < 0.9:
                alphabet = rng.choice(_ALPHABETS)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
            else:  # any code point outside the surrogates, assigned or not
                cps = [rng.randint(0x80, 0x10FFFF) for _ in range(rng.randint(1, 4))]
                parts.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
        out.append("".join(parts))
    return out


STRINGS = generated_strings()


# ---------------------------------------------------------------------------------------------
# llama.cpp side
# ---------------------------------------------------------------------------------------------


class LlamaCppVocab:
    """llama.cpp's tokenizer for one GGUF, through llama-cpp-python's bindings."""

    def __init__(self, path: Path):
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed")
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def detokenize(self, ids: list[int], special: bool) -> str:
        """llama_detokenize(remove_special=False, unparse_special=special), as common_detokenize."""
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 32 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def token_to_piece(self, token_id: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token_id, buf, 256, 0, special)
        assert n >= 0
        return buf.raw[:n]

    def eog_ids(self) -> set[int]:
        return {i for i in range(self.n_vocab) if self.lib.llama_vocab_is_eog(self.vocab, i)}

    def role(self, name: str) -> int | None:
        v = getattr(self.lib, f"llama_vocab_{name}")(self.vocab)
        return None if v < 0 else v


def check_against_llama_cpp(tok: Tokenizer, ref: LlamaCppVocab, strings: list[str]) -> None:
    """encode (4 flag combinations) and decode (both `special`) agree with llama.cpp on `strings`."""
    enc_bad, dec_bad, n = [], [], 0
    for s in strings:
        for add_special in (False, True):
            for parse_special in (False, True):
                n += 1
                ours = tok.encode(s, add_special=add_special, parse_special=parse_special)
                theirs = ref.tokenize(s, add_special, parse_special)
                if ours != theirs:
                    enc_bad.append((s, add_special, parse_special, ours, theirs))
                if add_special and parse_special:
                    for special in (False, True):
                        if tok.decode(theirs, special) != ref.detokenize(theirs, special):
                            dec_bad.append((s, special, tok.decode(theirs, special), ref.detokenize(theirs, special)))
    assert not enc_bad, f"{len(enc_bad)}/{n} encodings differ from llama.cpp, first: {enc_bad[:3]}"
    assert not dec_bad, f"{len(dec_bad)} decodings differ from llama.cpp, first: {dec_bad[:3]}"


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_ref(smollm2_path) -> LlamaCppVocab:
    return LlamaCppVocab(smollm2_path)


def vocab_path(name: str, *suffixes: str) -> Path:
    """tests/.cache/vocab/ggml-vocab-<name>.gguf (fetched once, `resources.vocab_dir`); the test
    skips only when the download is impossible (offline)."""
    try:
        directory = vocab_dir()
    except MlxLlamaError as e:
        pytest.skip(f"needs llama.cpp's vocab test files: {e}")
    path = directory / f"ggml-vocab-{name}.gguf"
    missing = [p.name for p in (path, *(Path(str(path) + s) for s in suffixes)) if not p.exists()]
    assert not missing, f"{', '.join(missing)} not in llama.cpp's vocab test files"
    return path


_vocab_cache: dict[str, Tokenizer] = {}  # the last few used: 128k-token vocabularies are big


def vocab_tokenizer(name: str, *suffixes: str) -> Tokenizer:
    path = vocab_path(name, *suffixes)
    tok = _vocab_cache.pop(name, None) or Tokenizer.from_gguf(GGUFFile(path))
    _vocab_cache[name] = tok
    while len(_vocab_cache) > 3:
        _vocab_cache.pop(next(iter(_vocab_cache)))
    return tok


# ---------------------------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------------------------


def test_smollm2_vocabulary(smol_tokenizer):
    assert (smol_tokenizer.model, smol_tokenizer.pre, smol_tokenizer.vocab_size) == ("gpt2", "smollm", 49152)
    assert (smol_tokenizer.add_bos, smol_tokenizer.add_eos) == (False, False)
    assert (smol_tokenizer.bos_id, smol_tokenizer.eos_id, smol_tokenizer.pad_id, smol_tokenizer.eom_id) == (1, 2, 2, None)


def test_smollm2_special_ids_match_llama_cpp(smol_tokenizer, smol_ref):
    assert smol_tokenizer.stop_ids == smol_ref.eog_ids()
    assert (smol_tokenizer.bos_id, smol_tokenizer.eos_id) == (smol_ref.role("bos"), smol_ref.role("eos"))
    # llama.cpp picks eot among several candidate texts in hash-map order; ours is by priority,
    # but it must be one of llama.cpp's end-of-generation tokens.
    assert smol_tokenizer.eot_id in smol_ref.eog_ids()
    assert smol_tokenizer.vocab_size == smol_ref.n_vocab


@pytest.mark.parametrize("add_special", [False, True])
@pytest.mark.parametrize("parse_special", [False, True])
def test_smollm2_encode_matches_llama_cpp(smol_tokenizer, smol_ref, add_special, parse_special):
    bad = []
    for s in STRINGS:
        ours = smol_tokenizer.encode(s, add_special=add_special, parse_special=parse_special)
        theirs = smol_ref.tokenize(s, add_special, parse_special)
        if ours != theirs:
            bad.append((s, ours, theirs))
    assert not bad, f"{len(bad)}/{len(STRINGS)} strings tokenized differently, first: {bad[:3]}"


@pytest.mark.parametrize("special", [False, True])
def test_smollm2_decode_matches_llama_cpp(smol_tokenizer, smol_ref, special):
    bad = []
    for s in STRINGS:
        ids = smol_ref.tokenize(s, True, True)
        if smol_tokenizer.decode(ids, special=special) != smol_ref.detokenize(ids, special):
            bad.append((s, smol_tokenizer.decode(ids, special=special), smol_ref.detokenize(ids, special)))
    assert not bad, f"{len(bad)}/{len(STRINGS)} decodings differ, first: {bad[:3]}"


def test_smollm2_token_to_piece_matches_llama_cpp(smol_tokenizer, smol_ref):
    ids = [*range(64), *range(0, smol_tokenizer.vocab_size, 97), smol_tokenizer.vocab_size - 1]
    for special in (False, True):
        assert [smol_tokenizer.token_to_piece(i, special) for i in ids] == [smol_ref.token_to_piece(i, special) for i in ids]
    assert smol_tokenizer.token_to_piece(1) == b"" and smol_tokenizer.token_to_piece(1, special=True) == b"<|im_start|>"
    with pytest.raises(IndexError):
        smol_tokenizer.token_to_piece(smol_tokenizer.vocab_size)


@pytest.fixture(scope="module")
def smol_representable(smol_tokenizer) -> list[str]:
    """The STRINGS SmolLM2 can represent.

    Its byte-level vocabulary lacks a few bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1,
    0xF2, ...: so also every code point in U+40000..U+BFFFF); llama.cpp silently drops those.
    """
    single_bytes = {p[0] for p in map(smol_tokenizer.token_to_piece, range(smol_tokenizer.vocab_size)) if len(p) == 1}
    strings = [s for s in STRINGS if set(s.encode()) <= single_bytes]
    assert len(strings) > len(STRINGS) // 2
    return strings


def test_smollm2_round_trip(smol_tokenizer, smol_representable):
    for s in smol_representable:
        assert smol_tokenizer.decode(smol_tokenizer.encode(s, add_special=False)) == s
        # with parse_special the control tokens come back only when rendered
        assert smol_tokenizer.decode(smol_tokenizer.encode(s, parse_special=True), special=True) == s


def test_smollm2_chat_control_tokens(smol_tokenizer, smol_ref):
    ids = smol_tokenizer.encode(CHAT, parse_special=True)
    assert ids == smol_ref.tokenize(CHAT, True, True)
    [im_start] = smol_tokenizer.encode("<|im_start|>", parse_special=True)
    [im_end] = smol_tokenizer.encode("<|im_end|>", parse_special=True)
    assert (im_start, im_end) == (1, 2)
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids[-4:] == [im_start] + smol_tokenizer.encode("assistant\n")
    assert smol_tokenizer.decode(ids[:4]) == "system\nYou"  # control tokens render as nothing by default
    # without parse_special the same text is ordinary characters
    plain = smol_tokenizer.encode(CHAT)
    assert im_start not in plain and im_end not in plain
    assert smol_tokenizer.decode(plain) == CHAT
    assert im_end in smol_tokenizer.stop_ids


def test_smollm2_streaming_detokenizer(smol_tokenizer, smol_representable):
    for s in smol_representable:
        for special in (False, True):
            ids = smol_tokenizer.encode(s, parse_special=True)
            detok = smol_tokenizer.detokenizer(special)
            pieces = [detok.add(i) for i in ids] + [detok.finalize()]
            assert "".join(pieces) == smol_tokenizer.decode(ids, special=special)
            if "\ufffd" not in s:  # every piece is whole characters: nothing was cut in two
                assert not any("\ufffd" in p for p in pieces), pieces
    # an emoji spelled with several byte-level tokens comes out whole, once it is complete
    ids = smol_tokenizer.encode("🦙")
    assert len(ids) > 1
    detok = smol_tokenizer.detokenizer()
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    # a dangling partial character is flushed as U+FFFD, like decode()
    detok = smol_tokenizer.detokenizer()
    assert detok.add(ids[0]) + detok.finalize() == smol_tokenizer.decode(ids[:1]) == "\ufffd"


def test_end_of_generation_texts_are_forced_to_control(smollm2_path):
    """llama.cpp treats e.g. <|im_end|> as a control token even when the file calls it normal."""
    meta = GGUFFile(smollm2_path)  # its own copy: the metadata is changed below
    types = list(meta.metadata["tokenizer.ggml.token_type"])
    types[2] = types[4] = 1  # <|im_end|> (end of generation) and <reponame> (FIM repo) → normal
    meta.metadata["tokenizer.ggml.token_type"] = types
    tok = Tokenizer.from_gguf(meta)
    assert {2, 4} <= tok.stop_ids
    for text, tid in (("<|im_end|>", 2), ("<reponame>", 4)):
        assert tok.encode(text, parse_special=True) == [tid]
        assert tid not in tok.encode(text)
        assert tok.decode([tid]) == "" and tok.decode([tid], special=True) == text


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _write_vocab_gguf(path: Path, model: str, pre: str | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["<unk>", "a", "b", "ab"])
    w.add_token_types([2, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_tokenizer_model_is_a_gguf_error(tmp_path):
    path = _write_vocab_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(GGUFError, match="unsupported tokenizer model 'bert'") as e:
        Tokenizer.from_gguf(GGUFFile(path))
    assert e.value.path == str(path)


def test_unknown_pre_tokenizer_is_a_gguf_error(tmp_path):
    path = _write_vocab_gguf(tmp_path / "foo.gguf", "gpt2", pre="foo")
    with pytest.raises(GGUFError, match="unsupported tokenizer pre-tokenizer 'foo'"):
        Tokenizer.from_gguf(GGUFFile(path))


def test_missing_tokenizer_model_is_a_gguf_error():
    with pytest.raises(GGUFError, match="unsupported tokenizer model None"):
        Tokenizer.from_gguf(SimpleNamespace(path="x.gguf", metadata={}))


@pytest.mark.parametrize("role", ["bos", "eos"])
def test_bos_or_eos_asked_for_but_missing_is_a_gguf_error(role):
    """The vocabulary asks for BOS/EOS but has no such token (BPE's default id 11 is out of range)."""
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["a b"], f"tokenizer.ggml.add_{role}_token": True}
    tok = Tokenizer("x.gguf", md)
    assert tok.encode("ab", add_special=False) == [2]
    with pytest.raises(GGUFError, match=f"x.gguf: vocabulary asks for {role.upper()} but has no {role.upper()} token") as e:
        tok.encode("ab")
    assert e.value.path == "x.gguf"


def test_tokenizer_keeps_its_metadata():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    assert Tokenizer("x.gguf", md).metadata is md


# ---------------------------------------------------------------------------------------------
# llama.cpp's vocab test files
# ---------------------------------------------------------------------------------------------


def read_vocab_tests(path: Path) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs, parsed as llama.cpp's tests/test-tokenizer-0.cpp does."""
    raw = Path(str(path) + ".inp").read_bytes().decode("utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    lines = Path(str(path) + ".out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(texts)
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.mark.parametrize("name", SUPPORTED_VOCAB_TESTS)
def test_llama_cpp_vocab_file(name):
    tok = vocab_tokenizer(name, ".inp", ".out")
    cases = read_vocab_tests(vocab_path(name))
    # test-tokenizer-0 tokenizes with add_special=False, parse_special=False
    failed = [(t, tok.encode(t, add_special=False), ids) for t, ids in cases if tok.encode(t, add_special=False) != ids]
    print(f"ggml-vocab-{name}: {len(cases) - len(failed)}/{len(cases)} llama.cpp tokenizer tests pass")
    assert not failed, f"{len(failed)}/{len(cases)} fail, first: {failed[:3]}"


@pytest.mark.parametrize("name", DIFFERENTIAL_VOCABS)
def test_llama_cpp_vocab_differential(name):
    ref = LlamaCppVocab(vocab_path(name))
    tok = vocab_tokenizer(name)
    assert tok.stop_ids == ref.eog_ids()
    assert (tok.bos_id, tok.eos_id) == (ref.role("bos"), ref.role("eos"))
    add_bos, add_eos = ref.lib.llama_vocab_get_add_bos(ref.vocab), ref.lib.llama_vocab_get_add_eos(ref.vocab)
    assert (tok.add_bos, tok.add_eos) == (add_bos, add_eos)
    check_against_llama_cpp(tok, ref, STRINGS[:150])


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe"])
def test_clean_up_spaces_matches_llama_cpp(name):
    """llama.cpp's detokenizer clean-up (" ." → ".", " ' " → "'", " 's" → "'s"), streamed too."""
    ref = LlamaCppVocab(vocab_path(name))
    tok = vocab_tokenizer(name)
    assert tok.clean_spaces
    rng = random.Random(7)
    chunks = [" ", " ", " ", "'", "'", "'", ".", ",", "?", "!", "s", "m", "re", "ve", "ll", "t", "d", "r", "a", "é"]
    bad = []
    for _ in range(400):
        text = "".join(rng.choice(chunks) for _ in range(rng.randint(1, 24)))
        ids = tok.encode(text, add_special=False)
        detok = tok.detokenizer()
        streamed = "".join([detok.add(i) for i in ids] + [detok.finalize()])
        if not tok.decode(ids) == streamed == ref.detokenize(ids, False):
            bad.append((text, tok.decode(ids), streamed, ref.detokenize(ids, False)))
    assert not bad, f"{len(bad)} differ, first: {bad[:3]}"


def test_spm_space_handling():
    """SentencePiece: a space is prefixed to every raw fragment; decode drops it once, llama.cpp style."""
    tok = vocab_tokenizer("llama-spm")
    assert (tok.model, tok.add_bos, tok.bos_id, tok.eos_id) == ("llama", True, 1, 2)
    hello = tok.encode("Hello", add_special=False)
    assert tok.decode(hello) == "Hello"
    assert tok.token_to_piece(hello[0]) == b" Hello"
    # BOS takes the one leading-space removal, as in llama_detokenize
    assert tok.decode([tok.bos_id] + hello) == " Hello"
    # text after a special token gets its own prefix space
    ids = tok.encode("Hello</s>Hello", parse_special=True)
    assert ids == [tok.bos_id, *hello, tok.eos_id, *hello]
    detok = tok.detokenizer()
    assert "".join([detok.add(i) for i in hello + hello] + [detok.finalize()]) == "Hello Hello"
    # bytes without a token of their own fall back to <0xXX> tokens
    assert tok.decode(tok.encode("🦙", add_special=False)) == "🦙"


def test_unsupported_llama_cpp_vocab_is_a_gguf_error():
    with pytest.raises(GGUFError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf(GGUFFile(vocab_path("bert-bge")))


# ---------------------------------------------------------------------------------------------
# special tokens against llama.cpp: roles, attributes, overlapping tokens, BOS/EOS flags
# ---------------------------------------------------------------------------------------------


def write_vocab_gguf(path: Path, meta: GGUFFile, changes: dict) -> Path:
    """A vocabulary-only GGUF with `meta`'s keys (their original types) updated by `changes`."""
    import gguf

    V = gguf.GGUFValueType
    md = {**meta.metadata, **changes}
    w = gguf.GGUFWriter(str(path), md["general.architecture"])
    for key, value in md.items():
        if key == "general.architecture":
            continue
        if key in meta.types:
            t, item = meta.types[key]
            w.add_key_value(key, value, V(t), sub_type=None if item is None else V(item))
        else:  # a new key: booleans and uint32 token ids are all we add
            w.add_key_value(key, value, V.BOOL if isinstance(value, bool) else V.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", ["smollm2", *SUPPORTED_VOCAB_TESTS])
def test_special_tokens_match_llama_cpp(name, smollm2_path):
    """Every token's attributes (control, user-defined, unknown, byte, rstrip ...), the role ids
    and the end-of-generation set are llama.cpp's."""
    path = smollm2_path if name == "smollm2" else vocab_path(name)
    ref = LlamaCppVocab(path)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    attrs = [ref.lib.llama_vocab_get_attr(ref.vocab, i) for i in range(ref.n_vocab)]
    assert tok._attr == attrs
    assert tok.stop_ids == ref.eog_ids()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.role("bos"), ref.role("eos"), ref.role("pad"))
    add_bos, add_eos = ref.lib.llama_vocab_get_add_bos(ref.vocab), ref.lib.llama_vocab_get_add_eos(ref.vocab)
    assert (tok.add_bos, tok.add_eos) == (add_bos, add_eos)
    # Where several texts could be the EOT token llama.cpp takes the first its hash map yields
    # (so it varies with the C++ library); ours follows a fixed priority among the same texts.
    if ref.role("eot") is None:
        assert tok.eot_id is None
    else:
        assert tok.eot_id == ref.role("eot") or tok.eot_id in ref.eog_ids()


# Appended to a vocabulary: special tokens that contain, overlap and prefix each other.
EXTRA_SPECIALS = [
    ("<|a|>", 3), ("<|a|><|b|>", 3), ("|><|", 3), ("<|ab", 3), ("<|a", 3), ("<|eom_id|>", 3),
    ("<|b|>", 4), ("a|><", 4), ("b|>", 4), ("qzq", 4), (" y ", 4),
]  # texts that are not in the vocabularies already (llama.cpp requires unique texts)
_PIECES = ["<|a|>", "<|b|>", "<|a|><|b|>", "<|", "|>", "<", ">", "a", "b", "q", "z", "y", " ", "  ", "\n", "|><|",
           "<|ab", "qzq", "hello", "<|eom_id|>", "</s>", "<s>", "<|endoftext|>"]


@pytest.fixture(scope="module", params=["llama-spm", "gpt-2"])
def extended_vocab(request, tmp_path_factory):
    """(name, our Tokenizer, llama.cpp's, texts of the added tokens) of a vocabulary with
    EXTRA_SPECIALS appended, and add_bos / add_eos flipped from what the file says."""
    name = request.param
    meta = GGUFFile(vocab_path(name))
    md = meta.metadata
    changes = {
        "tokenizer.ggml.tokens": list(md["tokenizer.ggml.tokens"]) + [t for t, _ in EXTRA_SPECIALS],
        "tokenizer.ggml.token_type": list(md["tokenizer.ggml.token_type"]) + [k for _, k in EXTRA_SPECIALS],
        "tokenizer.ggml.add_bos_token": not md.get("tokenizer.ggml.add_bos_token", name != "gpt-2"),
        "tokenizer.ggml.add_eos_token": True,
    }
    if "tokenizer.ggml.scores" in md:
        changes["tokenizer.ggml.scores"] = list(md["tokenizer.ggml.scores"]) + [0.0] * len(EXTRA_SPECIALS)
    path = write_vocab_gguf(tmp_path_factory.mktemp("vocab") / f"{name}-extended.gguf", meta, changes)
    ref = LlamaCppVocab(path)
    new_meta = GGUFFile(path)
    return name, Tokenizer.from_gguf(new_meta), ref


def report(capsys, line: str) -> None:
    """Print `line` to the terminal even while pytest captures output (the counts a test ran)."""
    with capsys.disabled():
        print(f"\n  {line}", end="")


def test_overlapping_special_tokens_match_llama_cpp(extended_vocab, capsys):
    """Longest special token first, each one cut out everywhere before the next is tried."""
    name, tok, ref = extended_vocab
    n0 = tok.vocab_size - len(EXTRA_SPECIALS)
    ids = {t: n0 + k for k, (t, _) in enumerate(EXTRA_SPECIALS)}
    # the flags come from the metadata, both for llama.cpp and for us
    add_bos, add_eos = ref.lib.llama_vocab_get_add_bos(ref.vocab), ref.lib.llama_vocab_get_add_eos(ref.vocab)
    assert (tok.add_bos, tok.add_eos) == (add_bos, add_eos) == (name == "gpt-2", True)
    # "<|eom_id|>" is found by its text, like llama.cpp, and ends generation
    assert tok.eom_id == ids["<|eom_id|>"] and tok.eom_id in tok.stop_ids == ref.eog_ids()
    assert tok._attr == [ref.lib.llama_vocab_get_attr(ref.vocab, i) for i in range(ref.n_vocab)]

    # hand-checked cases: the longest token wins, control tokens only with parse_special
    assert tok.encode("<|a|><|b|>", add_special=False, parse_special=True) == [ids["<|a|><|b|>"]]
    assert tok.encode("<|a|><|b|>|><|", add_special=False, parse_special=True) == [ids["<|a|><|b|>"], ids["|><|"]]
    # without parse_special only user-defined tokens count; the longer "<|b|>" is cut out before
    # "a|><", although "a|><" starts further left and overlaps it
    assert tok.encode("<|a|><|b|>", add_special=False) == tok.encode("<|a|>", add_special=False) + [ids["<|b|>"]]
    assert tok.encode("<|a|><|c", add_special=False)[-3:-1] == [ids["a|><"]] + tok.encode("|c", add_special=False)[:1]

    rng = random.Random(5)
    strings = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12))) for _ in range(1500)]
    bad, n = [], 0
    for s in strings:
        for add_special in (False, True):
            for parse_special in (False, True):
                n += 1
                ours, theirs = tok.encode(s, add_special, parse_special), ref.tokenize(s, add_special, parse_special)
                if ours != theirs:
                    bad.append((s, add_special, parse_special, ours, theirs))
    report(capsys, f"{name} + overlapping special tokens: {len(strings)} strings x 4 flag combos = {n}, "
                   f"{len(bad)} mismatches")
    assert not bad, f"{len(bad)}/{n} differ from llama.cpp, first: {bad[:3]}"
    # and back
    for s in strings[:300]:
        ids_ = ref.tokenize(s, True, True)
        for special in (False, True):
            assert tok.decode(ids_, special) == ref.detokenize(ids_, special)


def test_spm_raw_prompt_parses_eos():
    """A raw (Phi-3 style) prompt on the SPM vocabulary: with parse_special `</s>` is the EOS id."""
    tok = vocab_tokenizer("llama-spm")
    ref = LlamaCppVocab(vocab_path("llama-spm"))
    prompt = "<|user|>\nHi</s>\n<|assistant|>\n"
    ids = tok.encode(prompt, parse_special=True)
    assert ids == ref.tokenize(prompt, True, True)
    eos_at = ids.index(tok.eos_id)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids[1:eos_at]) == "<|user|>\nHi"  # text before it; "<|user|>" is plain text here
    assert ids[eos_at + 1:] == tok.encode("\n<|assistant|>\n", add_special=False)  # new fragment, new "▁"
    # without parse_special "</s>" is just characters
    plain = tok.encode(prompt)
    assert tok.eos_id not in plain and plain == ref.tokenize(prompt, True, False)
    assert tok.decode(plain[1:]) == prompt


# ---------------------------------------------------------------------------------------------
# streaming detokenizer
# ---------------------------------------------------------------------------------------------


def _paragraph_ids(tok: Tokenizer) -> list[int]:
    text = ("Once upon a time, a llama 🦙 named Ōkami wrote 日本語 and Ελληνικά. \"It's fine ,\" she said ! "
            "Numbers: 3.14159, 2718281828.\n\t    indented code()\n")
    return tok.encode(text, add_special=False)


@pytest.mark.parametrize("name", ["smollm2", "llama-spm", "gpt-2"])
def test_streaming_detokenizer_is_linear(name, smollm2_path):
    """Streaming 4n tokens (n ≈ 5,000) takes about 4x as long as n (generous bound: < 10x),
    each token is rendered once, and the pieces concatenate to decode()."""
    import time

    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path)) if name == "smollm2" else vocab_tokenizer(name)
    paragraph = _paragraph_ids(tok)
    reps = -(-5_000 // len(paragraph))
    ids = paragraph * (4 * reps)
    assert len(ids) >= 20_000

    def stream(seq):
        detok = tok.detokenizer()
        return [detok.add(i) for i in seq] + [detok.finalize()]

    def best_time(seq):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            stream(seq)
            best = min(best, time.perf_counter() - t)
        return best

    small, large = best_time(ids[:len(ids) // 4]), best_time(ids)
    assert large < 10 * small, f"{len(ids) // 4} tokens: {small:.3f}s, {len(ids)} tokens: {large:.3f}s"

    calls = []
    render = tok.token_to_piece
    tok.token_to_piece = lambda i, special=False: calls.append(i) or render(i, special)
    try:
        pieces = stream(ids)
    finally:
        del tok.token_to_piece
    assert calls == ids
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_detokenizer_emits_complete_characters():
    """Byte-fallback tokens (SPM) are held back until their character is complete; the
    SentencePiece prefix space of the first token is dropped, later ones are kept."""
    tok = vocab_tokenizer("llama-spm")
    llama = tok.encode("🦙", add_special=False)  # "▁" then four <0xXX> byte tokens
    assert len(llama) == 5
    detok = tok.detokenizer()
    assert [detok.add(i) for i in llama] == ["", "", "", "", "🦙"]
    hello, world = tok.encode("Hello world", add_special=False)
    detok = tok.detokenizer()
    assert [detok.add(hello), detok.add(world), detok.finalize()] == ["Hello", " world", ""]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_streaming_continuation_keeps_the_first_space(name):
    """Tokens generated after a prompt stream as the text they add to it: the first one keeps
    its SentencePiece space (llama.cpp prints each generated token's piece as is)."""
    tok = vocab_tokenizer(name)
    ref = LlamaCppVocab(vocab_path(name))
    text = "The capital of France is Paris, of course. 日本語 🦙 and so on."
    full = tok.encode(text)
    for k in range(1, len(full)):
        detok = tok.detokenizer(continuation=True)
        streamed = "".join([detok.add(i) for i in full[k:]] + [detok.finalize()])
        prefix = ref.detokenize(full[:k], False)
        if "\ufffd" in prefix:  # the prompt ends inside a character
            continue
        assert streamed == ref.detokenize(full, False)[len(prefix):] == tok.decode(full)[len(tok.decode(full[:k])):]
    if name == "llama-spm":
        paris = tok.encode("Paris", add_special=False)
        assert "".join(tok.detokenizer(continuation=True).add(i) for i in paris) == " Paris"
        assert "".join(tok.detokenizer().add(i) for i in paris) == "Paris"
