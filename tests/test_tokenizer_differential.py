"""mlx_llama.tokenizer against llama.cpp's tokenizer on thousands of generated strings.

For every vocabulary below, `N_STRINGS` strings (fixed seed) mixing English, code, digits,
whitespace runs, many scripts, emoji, random code points and look-alikes of special tokens
(the vocabulary's own, partial ones, with spaces around) are

* encoded with each add_special × parse_special combination: ids equal llama.cpp's
  (`llama_tokenize` through llama-cpp-python's `Llama(vocab_only=True).tokenize`);
* decoded (llama.cpp's ids, special on and off): text equals llama.cpp's `llama_detokenize`,
  and the streaming detokenizer's pieces concatenate to the same text;
* round-tripped: `decode(encode(s)) == s` exactly where llama.cpp's own round trip holds.

Each test prints what it ran (strings × combinations, mismatches). The vocabularies are
SmolLM2 and llama.cpp's test files (tests/.cache/vocab/, from scripts/fetch_vocab_tests.sh):
VOCABS get MLX_LLAMA_TOKENIZER_STRINGS strings each (default 2000), EXTRA_VOCABS
MLX_LLAMA_TOKENIZER_EXTRA_STRINGS (default 500, to keep this file under a minute; all of them
pass at 2000 too). test_unicode_tables_are_llama_cpp_s checks the character tables the
pre-tokenizer regexes are built from against the ones compiled into llama.cpp's library.
"""

from __future__ import annotations

import os
import random
import re
import struct
from pathlib import Path

import pytest
from test_tokenizer import LlamaCppVocab, report, vocab_path

from mlx_llama.gguf_file import GGUFFile
from mlx_llama.tokenizer import Tokenizer
from mlx_llama.tokenizer.alphabet import Attr
from mlx_llama.tokenizer.unicode_data import UNICODE_RANGES, WHITESPACE

N_STRINGS = int(os.environ.get("MLX_LLAMA_TOKENIZER_STRINGS", "2000"))
N_STRINGS_EXTRA = int(os.environ.get("MLX_LLAMA_TOKENIZER_EXTRA_STRINGS", "500"))
SEED = 20250605
COMBOS = [(False, False), (False, True), (True, False), (True, True)]  # (add_special, parse_special)

# N_STRINGS each: SentencePiece (llama-spm; phi-3, whose special tokens swallow the whitespace
# after them) and byte-level BPE (SmolLM2, the default model, and the gpt-2, llama3 and qwen2
# pre-tokenizers).
VOCABS = ["smollm2", "llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2"]
# N_STRINGS_EXTRA each (fewer by default to keep the file's run time down; llama.cpp itself is
# slow on the std::regex pre-tokenizers of deepseek, command-r, falcon): every other vocabulary.
EXTRA_VOCABS = ["baichuan", "qwen35", "mpt", "gpt-neox", "starcoder", "refact", "command-r", "falcon",
                "deepseek-coder", "deepseek-llm", "aquila"]
ALL_VOCABS = [pytest.param(v, id=v) for v in VOCABS] + [pytest.param(v, id=v) for v in EXTRA_VOCABS]


# ---------------------------------------------------------------------------------------------
# generated strings
# ---------------------------------------------------------------------------------------------

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world!", "Hello", " world", "I'm", "you're",
    "they'll", "it's", "We've", "DON'T", " don't", "isn't", "'s", "'S", "'ll", "O'Neil's", "rock 'n' roll",
    "e.g.", "Mr. Smith", "U.S.A.", "ALL CAPS", "camelCaseWord", "snake_case_word", "kebab-case-word",
    "Once upon a time, there was a llama.", " ... ", "?!", " ?", " !", " .", " ,", "(parenthesised)",
    "\"quoted\"", "'single'", "— em dash —", "well-known", "naïve café", "façade", "résumé", "Zürich",
]
_CODE = [
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2.5, null], "b": true}', '<div class="x">&nbsp;</div>', "SELECT * FROM t WHERE id = 42;",
    "x = y  # comment", "a->b", "std::vector<int>", "a && b || !c", "x !== y", "(a) => a", "0x7fff",
    "1e-9", "#include <stdio.h>\n", "<?php echo $x; ?>", "$HOME/.bashrc", "~/src/main.rs", "i += 1;",
    "    if x:\n        pass\n", "```python\nprint('hi')\n```", "//comment", "/* block */", "<<EOF",
    "\\n", "\\\\", "\\u00e9", "%d%%", "@decorator", "[[nodiscard]]", "a[i][j]", "f(*args, **kwargs)",
]
_WS = [" ", " ", " ", "\t", "\n", "\n", "\r\n", "\r", "\v", "\f", "\u00a0", "\u3000", "\u2009", "\u2028",
       "\u0085", "\u1680", "\u200b", "\x1c", "\x1f"]
_SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "éèêëàâäôöûüçñßøåæœÉÀÇÑ", "αβγδεζηθικλμνξοπρστυφχψωΩΣΔ", "привет мир ёЖЩЫ", "שלום עולם", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "你好世界中文字符测试漢字", "こんにちは世界カタカナひらがな", "안녕하세요 세계",
    "١٢٣٤٥٦٧٨٩٠", "०१२३४५६७८९", "１２３４５ＡＢＣａｂｃ", "½¼¾²³¹⁰ⁿ", "∑∫∂√∞≠≤≥±×÷", "€£¥₹₽¢$",
    "←↑→↓↔⇒⇔", "─│┌┐└┘├┤", "\u0301\u0303\u0308\u0327\u0345", "ـ़ؑ", "\x00\x01\x07\x1b\x7f",
    "ꟊꟋꟌꟍꟚꟛꟜ\u1c89\u1c8a", "\U000105c0\U000105c1\U00010d40\U00016d40\U0001ccf0",  # newer than llama.cpp's Unicode
]
_EMOJI = ["🙂", "😀😃😄", "👍🏽", "❤️", "❤️‍🔥", "👨‍👩‍👧‍👦", "🇩🇪🇯🇵", "1️⃣", "🏳️‍🌈", "🦙", "🤖", "✨", "🎉"]
_SPECIAL_LOOKALIKES = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>", "<unk>", "<pad>", "<|user|>", "<|assistant|>",
    "<|system|>", "<|end|>", "[INST]", "[/INST]", "<<SYS>>", "<|im_sta", "im_end|>", "<|", "|>", "<", ">",
    "</", "<s", "s>", "<|IM_START|>", "<| im_start |>", "<<|im_end|>>", "<|im_start|><|im_end|>", "<0x0A>",
    "▁", "Ġ", "Ċ", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|reserved_special_token_0|>",
    "<|fim_prefix|>", "<fim_prefix>", "<filename>", "<reponame>", "<jupyter_code>", "<|file_sep|>",
]


def _random_code_points(rng: random.Random) -> str:
    cps = []
    for _ in range(rng.randint(1, 6)):
        plane = rng.choice([0, 0, 0, 1, 1, 2, 3, 14, 15])
        cp = plane << 16 | rng.randint(0, 0xFFFF)
        if not 0xD800 <= cp < 0xE000:
            cps.append(chr(cp))
    return "".join(cps)


def _special_texts(tok: Tokenizer, rng: random.Random) -> list[str]:
    """The vocabulary's role tokens and a sample of its other special tokens."""
    role_ids = [tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id, tok.unk_id, *sorted(tok.stop_ids)]
    specials = [i for i in range(tok.vocab_size) if tok._attr[i] & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)]
    picked = [i for i in role_ids if i is not None] + rng.sample(specials, min(40, len(specials)))
    return list(dict.fromkeys(tok._texts[i] for i in picked))


def _mangle(text: str, rng: random.Random) -> str:
    """A partial, spaced or altered copy of a special token's text."""
    k = rng.randint(1, max(1, len(text) - 1))
    return rng.choice([
        text[:k], text[k:], f" {text} ", f" {text}", f"{text} ", f"\n{text}\n", text + text, text.upper(),
        text[:k] + " " + text[k:], text[:k] + text, f"{text}\t\n ", f"{text[:k]}{text}{text[k:]}",
    ])


def generated_strings(tok: Tokenizer, n: int = N_STRINGS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    specials = _special_texts(tok, rng)
    lookalikes = _SPECIAL_LOOKALIKES + specials
    out = ["", " ", "  ", "\n", "\n\n\n", " \t \n ", "a", "Hello world", " Hello world", "   leading and trailing   ",
           "<|user|>\nHi</s>\n<|assistant|>\n", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
           "".join(specials[:8]), " ".join(specials[:8]), "\n".join(specials[:8])]
    kinds = ["english", "code", "digits", "ws", "script", "emoji", "codepoints", "lookalike", "special", "mangled"]
    weights = [14, 10, 8, 12, 14, 5, 5, 10, 12, 10]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 60 if rng.random() < 0.05 else 10)):
            kind = rng.choices(kinds, weights)[0]
            if kind == "english":
                part = rng.choice(_ENGLISH)
            elif kind == "code":
                part = rng.choice(_CODE)
            elif kind == "digits":
                part = rng.choice([
                    str(rng.randint(0, 10 ** rng.randint(1, 20))), f"{rng.random() * 1000:.{rng.randint(0, 6)}f}",
                    f"{rng.randint(0, 10 ** 9):,}", f" {rng.randint(0, 99999)}", "-" + str(rng.randint(0, 999)),
                ])
            elif kind == "ws":
                part = "".join(rng.choice(_WS) for _ in range(rng.randint(1, 12)))
            elif kind == "script":
                alphabet = rng.choice(_SCRIPTS)
                part = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
            elif kind == "emoji":
                part = "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 4)))
            elif kind == "codepoints":
                part = _random_code_points(rng)
            elif kind == "lookalike":
                part = rng.choice(_SPECIAL_LOOKALIKES)
            elif kind == "special":
                part = rng.choice(specials)
            else:
                part = _mangle(rng.choice(lookalikes), rng)
            if rng.random() < 0.25:  # whitespace around the part
                part = rng.choice(_WS) * rng.randint(1, 3) + part + rng.choice(_WS) * rng.randint(0, 3)
            parts.append(part)
        out.append("".join(parts))
    return out[:n]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


class Case:
    """One vocabulary: our tokenizer, llama.cpp's, the strings and llama.cpp's ids for them."""

    def __init__(self, name: str, path: Path, n: int):
        self.name = name
        self.ref = LlamaCppVocab(path)
        self.tok = Tokenizer.from_gguf(GGUFFile(path))
        self.strings = generated_strings(self.tok, n)
        # llama.cpp's ids per flag combination, computed once for the encode and round-trip tests
        self.ids = {combo: [self.ref.tokenize(s, *combo) for s in self.strings] for combo in COMBOS}


@pytest.fixture(scope="module", params=ALL_VOCABS)
def case(request) -> Case:
    """One vocabulary's Case; module-scoped, so pytest runs each vocabulary's tests together and
    holds one vocabulary (ours and llama.cpp's) at a time."""
    name = request.param
    path = request.getfixturevalue("smollm2_path") if name == "smollm2" else vocab_path(name)
    return Case(name, path, N_STRINGS if name in VOCABS else N_STRINGS_EXTRA)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_encode_matches_llama_cpp(case, capsys):
    name = case.name
    bad, n = [], 0
    for combo in COMBOS:
        for s, theirs in zip(case.strings, case.ids[combo]):
            n += 1
            ours = case.tok.encode(s, *combo)
            if ours != theirs:
                bad.append((s, combo, ours, theirs))
    report(capsys, f"encode {name}: {len(case.strings)} strings x {len(COMBOS)} (add_special, parse_special) "
                   f"= {n}, {len(bad)} mismatches")
    assert len(case.strings) == (N_STRINGS if name in VOCABS else N_STRINGS_EXTRA)
    assert not bad, f"{len(bad)}/{n} encodings differ from llama.cpp, first: {bad[:3]}"


def test_decode_and_stream_match_llama_cpp(case, capsys):
    """decode and the streaming detokenizer of llama.cpp's ids (add_special, parse_special on)."""
    name = case.name
    bad, n = [], 0
    for s, ids in zip(case.strings, case.ids[True, True]):
        for special in (False, True):
            n += 1
            theirs = case.ref.detokenize(ids, special)
            detok = case.tok.detokenizer(special)
            streamed = "".join([detok.add(i) for i in ids] + [detok.finalize()])
            if not case.tok.decode(ids, special) == streamed == theirs:
                bad.append((s, special, case.tok.decode(ids, special), streamed, theirs))
    report(capsys, f"decode {name}: {len(case.strings)} strings x 2 (special off/on) = {n}, {len(bad)} mismatches")
    assert not bad, f"{len(bad)}/{n} decodings differ from llama.cpp, first: {bad[:3]}"


def _llama_cpp_python_detokenize(ref: LlamaCppVocab, ids: list[int], special: bool) -> str | None:
    try:
        return ref.llm.detokenize(ids, special=special).decode("utf-8", "replace")
    except AssertionError:  # llama-cpp-python's 32-byte piece buffer overflows on long tokens
        return None


def test_round_trip(case, capsys):
    """decode(encode(s)) == s exactly where llama.cpp's tokenize → detokenize gives s back.

    llama.cpp's round trip is `llama_detokenize(llama_tokenize(s, add_special, parse_special),
    remove_special=False, unparse_special=parse_special)` (as llama.cpp's common_detokenize);
    ours `decode(encode(s, add_special, parse_special), special=parse_special)`. They must
    hold for the same strings. For information the test also counts llama-cpp-python's
    `Llama.detokenize` round trip, which concatenates token pieces without llama.cpp's
    detokenizer rules (it drops a space after a leading BOS instead of the first token's
    SentencePiece prefix space, and skips the clean-up of " ." / " 's" of BPE vocabularies).
    """
    name = case.name
    n = held = held_ours = held_py = 0
    bad = []
    for combo in COMBOS:
        parse_special = combo[1]
        for s, theirs_ids in zip(case.strings, case.ids[combo]):
            n += 1
            theirs = case.ref.detokenize(theirs_ids, parse_special) == s
            ours = case.tok.decode(case.tok.encode(s, *combo), special=parse_special) == s
            held, held_ours = held + theirs, held_ours + ours
            held_py += _llama_cpp_python_detokenize(case.ref, theirs_ids, parse_special) == s
            if ours != theirs:
                bad.append((s, combo, ours, theirs))
    report(capsys, f"round trip {name}: {n} (string, flags) pairs; s comes back for llama.cpp {held}, "
                   f"mlx_llama {held_ours}, disagreements {len(bad)} (llama-cpp-python Llama.detokenize: {held_py})")
    assert held > 0
    assert not bad, f"{len(bad)}/{n} round trips disagree with llama.cpp's, first: {bad[:3]}"
    if name == "llama-spm":
        check_spm_round_trip_without_special_tokens(case, capsys)


def check_spm_round_trip_without_special_tokens(case, capsys):
    """The plain round trip of an SPM vocabulary: no BOS, no special tokens, prefix space dropped."""
    tok, ref, strings = case.tok, case.ref, case.strings
    ok = [s for s in strings if tok.decode(tok.encode(s, add_special=False)) == s]
    theirs = [s for s, ids in zip(strings, case.ids[False, False]) if ref.detokenize(ids, False) == s]
    report(capsys, f"round trip llama-spm, add_special=False: {len(ok)}/{len(strings)} (llama.cpp {len(theirs)})")
    assert ok == theirs and len(ok) > len(strings) // 2


# ---------------------------------------------------------------------------------------------
# llama.cpp's Unicode tables
# ---------------------------------------------------------------------------------------------


def _llama_cpp_library() -> bytes:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed")
    lib = llama_cpp.llama_cpp._lib
    path = Path(getattr(lib, "_name", ""))
    if not path.is_file():
        pytest.skip(f"cannot locate llama.cpp's shared library ({path})")
    return path.read_bytes()


def _ranges(mask: list[bool]) -> str:
    out, start = [], None
    for cp, m in enumerate([*mask, False]):
        if m and start is None:
            start = cp
        elif not m and start is not None:
            out.append(f"{start:x}" if start == cp - 1 else f"{start:x}-{cp - 1:x}")
            start = None
    return " ".join(out)


def test_unicode_tables_are_llama_cpp_s():
    """Our \\p{L}/\\p{N}/\\p{M}/\\p{P} ranges and whitespace are exactly those compiled into libllama.

    llama.cpp's `unicode_ranges_flags` (src/unicode-data.cpp) is an array of
    {uint32 first code point, uint16 flags} pairs (8 bytes each, padded); it is found in the
    library by its first three entries, and the whitespace set by its sorted uint32 values.
    """
    data = _llama_cpp_library()
    head = struct.pack("<IHxxIHxxIHxx", 0x0, 0x0080, 0x20, 0x0008, 0x21, 0x0020)
    at = data.find(head)
    if at < 0:
        pytest.skip("llama.cpp's unicode_ranges_flags table not found in its library")
    starts, flags = [], []
    while True:
        start, flag = struct.unpack_from("<IH", data, at + 8 * len(starts))
        if starts and start <= starts[-1]:
            break
        starts.append(start)
        flags.append(flag)
        if start >= 0x110000:
            break
    assert starts[-1] == 0x110000, "table not terminated where expected"
    per_cp = []
    for k in range(len(starts) - 1):
        per_cp += [flags[k]] * (starts[k + 1] - starts[k])
    for cat, bit in (("L", 0x4), ("N", 0x2), ("M", 0x10), ("P", 0x20)):
        assert " ".join(UNICODE_RANGES[cat].split()) == _ranges([f & bit != 0 for f in per_cp]), cat

    # std::unordered_set's initializer: all but its last value (U+3000) are stored as an array
    ws = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
          0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
    assert struct.pack(f"<{len(ws) - 1}I", *ws[:-1]) in data, "llama.cpp's whitespace set differs"
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert [ord(c) for c in re.findall(f"[{WHITESPACE}]", every)] == ws
