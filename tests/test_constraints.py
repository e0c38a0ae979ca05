"""Constrained generation (`mlx_llama.constraints`): the token mask in the sampler chain by hand,
llguidance's view of BPE and SentencePiece vocabularies, the decode loop's order (mask n+1
computed while forward pass n+1 is queued), generation that must match, and one-line errors.

SmolLM2's sampled outputs are checked against their schema, regex or grammar; a tiny model
with random weights is the adversary: whatever it prefers, the output must match."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from mlx_llama import constraints
from mlx_llama.constraints import ConstraintError
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.sample import SamplingParams, apply_token_mask, make_sampler, process_logits
from mlx_llama.tokenizer import Tokenizer
from mlx_llama.tokenizer.alphabet import Attr
from structured_acceptance import ARITHMETIC_GBNF, ARITHMETIC_LARK, is_arithmetic, make_schemas
from test_tokenizer import vocab_path

INF = float("inf")
OFF = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)


def bitmask(allowed, vocab: int) -> mx.array:
    """llguidance's layout, written by hand: token i is bit i % 32 of word i // 32."""
    words = np.zeros((vocab + 31) // 32, np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return mx.array(words)


def allowed_ids(words: mx.array, vocab: int) -> list[int]:
    bits = np.unpackbits(np.array(words).view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits).tolist()


# ---- the mask in the sampler chain ------------------------------------------------------


def test_mask_keeps_exactly_the_allowed_tokens_across_words():
    vocab = 70  # three words; token 31 is the sign bit of an int32 word, 69 in a partial word
    logits = mx.arange(vocab, dtype=mx.float32)
    out = np.array(apply_token_mask(logits, bitmask([0, 31, 32, 69], vocab)))
    assert np.flatnonzero(np.isfinite(out)).tolist() == [0, 31, 32, 69]
    assert out[[0, 31, 32, 69]].tolist() == [0.0, 31.0, 32.0, 69.0]


def test_masked_distribution_by_hand():
    """Probabilities 0.5, 0.3, 0.15, 0.05 with token 0 masked: 0.3, 0.15, 0.05 renormalised;
    top-k 2 then takes the two best *allowed* tokens (the mask comes first, as in llama.cpp)."""
    logits = mx.array([[math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]])
    mask = bitmask([1, 2, 3], 4)
    p = np.array(mx.softmax(process_logits(logits, None, SamplingParams(**OFF), mask), axis=-1))[0]
    assert p.tolist() == pytest.approx([0, 0.6, 0.3, 0.1])
    p = np.array(mx.softmax(process_logits(logits, None, SamplingParams(**{**OFF, "top_k": 2}), mask), axis=-1))[0]
    assert p.tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0])


def test_greedy_takes_the_best_allowed_token_and_bias_cannot_unmask():
    logits = mx.array([[5.0, 4.0, 3.0, 2.0]])
    assert make_sampler(SamplingParams(temp=0))(logits, None, bitmask([2, 3], 4)).item() == 2
    # +inf bias on a masked token: no NaN, and the token stays out
    sample = make_sampler(SamplingParams(seed=1, logit_bias={0: INF}, repeat_penalty=1.3))
    draws = {sample(logits, mx.array([0, 3], mx.int32), bitmask([1, 3], 4)).item() for _ in range(30)}
    assert draws <= {1, 3} and draws


# ---- the vocabulary as llguidance sees it ----------------------------------------------


@pytest.fixture(scope="module", params=["smollm2", "llama-spm", "phi-3", pytest.param("qwen2", marks=pytest.mark.slow),
                                                  pytest.param("command-r", marks=pytest.mark.slow)])
def vocab_tokenizer(request, smollm2_path):
    path = smollm2_path if request.param == "smollm2" else vocab_path(request.param)
    return Tokenizer.from_gguf(GGUFFile(path))


def first_mask(tokenizer, constraint) -> list[int]:
    return allowed_ids(constraint.matcher(tokenizer).mask(), tokenizer.vocab_size)


LANGUAGE = [c + d for c in "ab" for d in ["", *"0123456789"]] + ["<s>", "</s>", "<|im_start|>", "<BOS_TOKEN>"]


def test_first_tokens_are_those_that_start_an_answer(vocab_tokenizer):
    """The tokens allowed first are exactly those whose bytes (`token_to_piece`: byte-level BPE,
    SentencePiece `▁` and `<0xXX>` alike) start a string of the language; special tokens never,
    even where their text would fit (control and unknown tokens, user-defined ones written
    `<…>`: llama.cpp's rule)."""
    tok = vocab_tokenizer
    prefixes = {w[:k].encode() for w in LANGUAGE for k in range(1, len(w) + 1)}
    expected = [i for i in range(tok.vocab_size) if (p := tok.token_to_piece(i, special=True)) in prefixes
                and not tok.token_attr(i) & (Attr.CONTROL | Attr.UNKNOWN) and i not in tok.stop_ids
                and not (tok.token_attr(i) & Attr.USER_DEFINED and p[:1] == b"<" and p[-1:] == b">")]
    allowed = first_mask(tok, constraints.regex("|".join(re.escape(w) for w in LANGUAGE)))
    assert len(expected) > 2 and allowed == expected
    # the language spells a special token of every vocabulary here (<s>, </s>, <|im_start|>, <BOS_TOKEN>)
    assert [i for i in range(tok.vocab_size) if tok.token_to_piece(i, special=True) in prefixes and i not in expected]


def test_control_tokens_are_not_text(smol_tokenizer):
    tok = smol_tokenizer
    (im_start,) = tok.encode("<|im_start|>", add_special=False, parse_special=True)
    allowed = first_mask(tok, constraints.regex(r"<\|im_start\|>"))
    assert im_start not in allowed and allowed  # "<", "<|" …: the text, spelt in plain tokens


def test_end_of_generation_tokens_only_once_complete(vocab_tokenizer):
    tok = vocab_tokenizer
    m = constraints.regex("a|ab").matcher(tok)
    assert not set(allowed_ids(m.mask(), tok.vocab_size)) & tok.stop_ids
    (a,) = [i for i in range(tok.vocab_size) if tok.token_to_piece(i) == b"a"][:1]
    m.advance(a)
    after = set(allowed_ids(m.mask(), tok.vocab_size))
    assert tok.stop_ids <= after and after - tok.stop_ids  # complete, or "b" may follow
    eos = min(tok.stop_ids)
    m.advance(eos)
    assert m.finished


def test_padded_logits_are_never_allowed(smol_tokenizer):
    """A model whose output layer is wider than the vocabulary: the extra logits are masked."""
    n = smol_tokenizer.vocab_size + 40
    words = constraints.json_object().matcher(smol_tokenizer, n).mask()
    assert words.shape == ((n + 31) // 32,)
    assert max(allowed_ids(words, n)) < smol_tokenizer.vocab_size


def test_a_rejected_token_is_an_error(smol_tokenizer):
    m = constraints.regex("[0-9]+").matcher(smol_tokenizer)
    m.mask()
    (letter,) = smol_tokenizer.encode("x", add_special=False)
    with pytest.raises(ConstraintError, match="does not continue"):
        m.advance(letter)


# ---- the decode loop --------------------------------------------------------------------


class Recorder:
    """Stands in for the model and the matcher, writing down the order of their calls."""

    def __init__(self, vocab=64):
        self.events, self.vocab = [], vocab
        self.finished, self.seconds = False, 0.0

    def __call__(self, tokens, cache):  # the model, one decode step
        self.events.append("forward")
        return mx.zeros((1, 1, self.vocab))

    def mask(self):
        self.events.append("mask")
        return bitmask([len(self.events) % self.vocab], self.vocab)

    def advance(self, token):
        self.events.append(f"advance {token}")


def test_mask_n_plus_1_is_computed_after_forward_n_plus_1_is_queued():
    from mlx_llama.generation import _constrained_decode
    from mlx_llama.sample import make_sampler

    rec = Recorder()
    sample = make_sampler(SamplingParams(temp=0))
    tokens = list(_constrained_decode(rec, None, mx.zeros((1, 64)), lambda x, m: (sample(x, None, m), mx.isfinite(x).all()), rec, 3))
    # the first mask overlaps the prefill; then each token: forward queued, advance, next mask
    assert rec.events == ["mask", "forward", f"advance {tokens[0]}", "mask",
                          "forward", f"advance {tokens[1]}", "mask", f"advance {tokens[2]}"]
    assert tokens == [1, 4, 7]  # the one token each mask allowed


# ---- generation -------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def test_sampled_json_validates(smollm2):
    jsonschema = pytest.importorskip("jsonschema")
    model, tok = smollm2
    stats = mlx_llama.GenerationStats()
    out = mlx_llama.generate(model, tok, "Describe a user as JSON.", 120, chat=True, temp=0.8, seed=0,
                             constraint=constraints.json_schema(SCHEMA), stats=stats)
    assert stats.finish_reason == "stop", out
    jsonschema.validate(json.loads(out), SCHEMA)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(3))
def test_sampled_json_validates_against_its_schema(smollm2, i):
    """The first schemas of `scripts/structured_acceptance.py`'s 50, answered as it does."""
    jsonschema = pytest.importorskip("jsonschema")
    from structured_acceptance import schema_prompt

    model, tok = smollm2
    schema = make_schemas(3)[i]
    stats = mlx_llama.GenerationStats()
    out = mlx_llama.generate(model, tok, schema_prompt(schema), 384, chat=True, temp=0.8, seed=i,
                             constraint=constraints.json_schema(schema), stats=stats)
    assert stats.finish_reason == "stop", out
    jsonschema.validate(json.loads(out), schema)


def test_pydantic_model_class(tiny_gguf):
    """A random model at a high temperature, so every choice is the mask's doing."""
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        population: int = pydantic.Field(ge=0, le=10**6)
        capital: bool

    model, tok = mlx_llama.load(tiny_gguf("F32"))
    for seed in range(3):
        out = mlx_llama.generate(model, tok, "x", 80, temp=1.5, top_k=0, min_p=0, seed=seed,
                                 constraint=constraints.pydantic_model(City))
        assert 0 <= City.model_validate_json(out).population <= 10**6


REGEX_CASES = [
    pytest.param("Is 'I loved this film' positive, negative or neutral?", r"positive|negative|neutral", marks=pytest.mark.slow),
    pytest.param("What is today's date?", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", marks=pytest.mark.slow),
    pytest.param("A phone number, please.", r"\(\d{3}\) \d{3}-\d{4}", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("prompt, pattern", REGEX_CASES)
def test_regex_outputs_match(smollm2, prompt, pattern):
    model, tok = smollm2
    for seed in range(2):
        out = mlx_llama.generate(model, tok, prompt, 30, chat=True, temp=0.8, seed=seed,
                                 constraint=constraints.regex(pattern))
        assert re.fullmatch(pattern, out, re.ASCII), out


@pytest.mark.slow  # the default run has the grammars on a random model
@pytest.mark.parametrize("text", [ARITHMETIC_LARK, ARITHMETIC_GBNF], ids=["lark", "gbnf"])
def test_arithmetic_grammar(smollm2, text):
    model, tok = smollm2
    outs = [mlx_llama.generate(model, tok, "Write an arithmetic expression.", 40, chat=True, temp=0.8, seed=seed,
                               constraint=constraints.grammar(text), stats=(stats := mlx_llama.GenerationStats()))
            for seed in range(3)]
    assert stats.finish_reason == "stop"
    assert all(is_arithmetic(o) for o in outs), outs


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3"])
def test_random_model_with_a_sentencepiece_vocabulary_still_matches(tiny_gguf, vocab):
    """Random weights prefer anything; the mask leaves them only the grammar's tokens."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    model, tok = mlx_llama.load(tiny_gguf("F32", vocab_from=vocab_path(vocab)))
    for seed in range(3):
        out = mlx_llama.generate(model, tok, "x", 60, temp=1.5, top_k=0, min_p=0, seed=seed,
                                 constraint=constraints.json_schema(schema))
        assert set(json.loads(out)) == {"ok", "n"}, out
        date = mlx_llama.generate(model, tok, "x", 20, temp=1.5, seed=seed, constraint=constraints.regex(r"\d{4}-\d{2}"))
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", date), date
        for text in (ARITHMETIC_LARK, ARITHMETIC_GBNF):
            stats = mlx_llama.GenerationStats()
            expr = mlx_llama.generate(model, tok, "x", 40, temp=1.5, seed=seed, stats=stats, constraint=constraints.grammar(text))
            # whole, or cut by max_tokens: a start of one (no letters, no bracket closed before it opens)
            closed = [expr + tail + ")" * (expr.count("(") - expr.count(")")) for tail in ("", "1")]
            assert is_arithmetic(expr) if stats.finish_reason == "stop" else any(map(is_arithmetic, closed)), expr
    # text the grammar forces is spelt in the tokenizer's own tokens, with no SentencePiece space
    forced = mlx_llama.generate(model, tok, "x", 20, temp=1.5, constraint=constraints.regex(r"ab<\|x\|>\n12"))
    assert forced == "ab<|x|>\n12"


# ---- errors: one line, never a hang -----------------------------------------------------

BAD = [
    (lambda: constraints.json_schema({"type": "integer", "minimum": 5, "maximum": 3}), "minimum (5) is greater"),
    (lambda: constraints.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable"),
    (lambda: constraints.json_schema({"type": "wat"}), "Invalid type"),
    (lambda: constraints.json_schema("{not json"), "not valid JSON"),
    (lambda: constraints.json_schema([1]), "expected an object"),
    (lambda: constraints.regex("(a"), "unclosed group"),
    (lambda: constraints.grammar("start: ("), "Expected token"),
    (lambda: constraints.grammar("root ::= foo"), "Rule 'foo' not found"),
    (lambda: constraints.pydantic_model(dict), "not a pydantic model"),
    (lambda: constraints.response_format({"type": "xml"}), 'response_format: expected type "text", "json_object" or "json_schema", not "xml"'),
    (lambda: constraints.response_format({"type": "json_schema", "json_schema": {"schema": 3}}), "response_format.json_schema: expected"),
    (lambda: constraints.response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}), "Invalid type"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_constraints_are_one_line_errors(make, message):
    with pytest.raises(ConstraintError, match=re.escape(message)) as e:
        make()
    assert "\n" not in str(e.value)


def test_response_format(smol_tokenizer):
    """OpenAI's response_format: text is no constraint; json_object and json_schema are
    llguidance's, so their first masks equal those of the same constraint made directly."""
    assert constraints.response_format({"type": "text"}) is None
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for spec, same in [({"type": "json_object"}, constraints.json_object()),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
                        constraints.json_schema(schema))]:
        made = constraints.response_format(spec)
        assert made.spec == same.spec and first_mask(smol_tokenizer, made) == first_mask(smol_tokenizer, same)


def test_a_regex_no_text_matches_is_an_error(smol_tokenizer):
    """At the first mask, or before it by `check()` (what the server asks, in another thread)."""
    empty = constraints.regex(r"[^\x00-\x{10FFFF}]")
    for first in (lambda m: m.mask(), lambda m: m.check()):
        with pytest.raises(ConstraintError, match="no text matches it"):
            first(empty.matcher(smol_tokenizer))
    constraints.regex("yes|no").matcher(smol_tokenizer).check()


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the README runs a shorter one (tests/test_readme.py)
def test_cli_json_schema_file(smollm2_path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    r = run_cli("generate", "-m", str(smollm2_path), "-n", "60", "--temp", "0", "Describe a user.", "--json-schema", str(schema))
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) >= {"name", "age", "role"}, r.stdout


@pytest.mark.slow
def test_cli_constraint_flags(smollm2_path, tmp_path):
    grammar = tmp_path / "arith.gbnf"
    grammar.write_text(ARITHMETIC_GBNF)
    for prompt, flags, check in [
        ("Is it raining?", ["--json-schema", json.dumps({"enum": ["yes", "no"]})], lambda s: json.loads(s) in ("yes", "no")),
        ('Write {"a": 1} as JSON.', ["--json"], lambda s: json.loads(s) == {"a": 1}),
        ("A number, please.", ["--regex", r"\d{3}"], lambda s: re.fullmatch(r"[0-9]{3}", s)),
        ("Write a sum.", ["--grammar", str(grammar)], is_arithmetic),
    ]:
        r = run_cli("generate", "-m", str(smollm2_path), "-n", "60", "--temp", "0", prompt, *flags)
        assert r.returncode == 0, (flags, r.stderr)
        assert check(r.stdout[:-1]), (flags, r.stdout)


def test_cli_bad_constraints_exit_2_with_one_line(tmp_path):
    for flags, expected in [
        (["--json-schema", '{"type": "integer", "minimum": 5, "maximum": 3}'], "JSON schema: Unsatisfiable"),
        (["--json-schema", str(tmp_path / "none.json")], "none.json: No such file"),
        (["--regex", "(a"], "regex: "),
        (["--json", "--regex", "a"], "give one constraint, not --json and --regex"),
    ]:
        r = run_cli("generate", "hi", *flags)
        assert r.returncode == 2, (flags, r.stderr)
        assert r.stderr.startswith("mlx_llama: error: ") and r.stderr.count("\n") == 1, (flags, r.stderr)
        assert expected in r.stderr, (flags, r.stderr)
