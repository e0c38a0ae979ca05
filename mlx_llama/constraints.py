"""Constrained generation: output that must match a JSON schema, a regex or a grammar.

The matching is llguidance's (the engine llama.cpp can use): it compiles the constraint into a
grammar, and at each step gives a bitmask of the tokens that can continue the text so far.
The sampler removes the rest (`sample.apply_token_mask`) before top-k/top-p/temperature, as
llama.cpp applies its grammar.

Two objects, so that one request's constraint can serve many sequences:

* `Constraint` — what the text must match; compiled and checked when it is made (a bad or
  unsatisfiable schema, regex or grammar raises `ConstraintError`, one line), immutable.
  Made by `json_schema`, `json_object`, `pydantic_model`, `regex` or `grammar`.
* `TokenMatcher` — one sequence's place in it (`constraint.matcher(tokenizer)`): `mask()` for
  the next token, `advance(token)` once it is sampled, `finished` after the end-of-generation
  token the grammar allowed.

llguidance sees the vocabulary as each token's bytes (`Tokenizer.token_to_piece`, so BPE and
SentencePiece alike). Special tokens are marked, so no grammar text can produce them; the
vocabulary's end-of-generation tokens are its EOS, allowed once the grammar is complete.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import ConstraintError
from .tokenizer.alphabet import Attr

try:
    import llguidance
except ImportError:  # the error is raised when a constraint is made, not on import
    llguidance = None


# llguidance's JSON defaults allow unbounded whitespace between tokens, which a small model at
# a high temperature can fill until max_tokens. Ours allow a space, or a newline and up to 20
# indentation characters: pretty-printed JSON, but no blank lines (llama.cpp's allow two newlines,
# which SmolLM2 then writes around every key).
JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})?"}


@dataclass(frozen=True)
class Constraint:
    """What generated text must match: a grammar llguidance has compiled and checked.

    name: what errors call it ("JSON schema", "regex", "grammar"); spec: llguidance's
    grammar (Lark text or its JSON form), as `llguidance.LLMatcher` takes it.
    """

    name: str
    spec: str

    def matcher(self, tokenizer, n_vocab: int | None = None) -> TokenMatcher:
        """A new sequence's state. n_vocab: the model's logits width (default: the vocabulary's)."""
        n_vocab = tokenizer.vocab_size if n_vocab is None else n_vocab
        return TokenMatcher(self, token_vocabulary(tokenizer, n_vocab), n_vocab)


def json_schema(schema: dict | bool | str) -> Constraint:
    """Output that is JSON valid under `schema` (a dict, or its JSON text)."""
    _need_llguidance()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"JSON schema: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"JSON schema: expected an object, not {type(schema).__name__}")
    try:
        spec = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(f"JSON schema: {one_line(str(e))}") from None
    return _checked("JSON schema", spec)


def json_object() -> Constraint:
    """Output that is any JSON object."""
    return json_schema({"type": "object"})


def pydantic_model(model: type) -> Constraint:
    """Output that is JSON a pydantic model class validates (`model.model_validate_json`).

    Its objects get no keys beyond their fields: pydantic's schema leaves `additionalProperties`
    out unless a model allows extra keys, and JSON Schema would then let a model add keys
    without end, which the class ignores or rejects."""
    if not hasattr(model, "model_json_schema"):
        raise ConstraintError(f"{getattr(model, '__name__', model)!s} is not a pydantic model class")
    return json_schema(_closed(model.model_json_schema()))


def _closed(schema):
    """`schema` with `additionalProperties: false` in every object schema that does not say."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def response_format(spec) -> Constraint | None:
    """The constraint of an OpenAI `response_format`: {"type": "text"} (None), {"type":
    "json_object"}, or {"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        inner = spec.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), (dict, bool)):
            raise ConstraintError("response_format.json_schema: expected {\"name\": ..., \"schema\": {...}}")
        return json_schema(inner.get("schema", {}))  # no schema: any JSON (OpenAI requires one)
    raise ConstraintError(f"response_format: expected type \"text\", \"json_object\" or \"json_schema\", "
                          f"not {json.dumps(kind if kind is not None else spec)}")


def regex(pattern: str) -> Constraint:
    """Output that matches `pattern` whole (Rust `regex` syntax, close to Python's); `\\d` is
    [0-9], as in llama.cpp's grammars (Unicode's digits would let a model write 🯸 for 8)."""
    _need_llguidance()
    lark = "start: /" + llguidance.regex_to_lark(pattern, "d") + "/"
    return _checked("regex", llguidance.LLMatcher.grammar_from_lark(lark))


def grammar(text: str) -> Constraint:
    """Output in the language of a grammar: Lark syntax (llguidance's dialect, rule `start`),
    or llama.cpp's GBNF (rule `root`), told apart by their syntax."""
    _need_llguidance()
    try:
        spec = llguidance.grammar_from("grammar", text)  # GBNF is translated to Lark
    except ValueError as e:
        raise ConstraintError(f"grammar: {one_line(str(e))}") from None
    return _checked("grammar", spec)


def _need_llguidance() -> None:
    if llguidance is None:
        raise ConstraintError("constrained generation needs llguidance: pip install llguidance")


def _checked(name: str, spec: str) -> Constraint:
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec, None, limits=_limits())
    if failed:
        raise ConstraintError(f"{name}: {one_line(messages[0])}")
    return Constraint(name, spec)


def _limits():
    # without verbose errors a message is the problem alone, not the parser's state and grammar
    return llguidance.LLParserLimits(verbose_errors=False)


_EXCERPT = re.compile(r"\s*(\d+ \|.*|\^+)\s*")  # the source lines llguidance quotes under a message


def one_line(message: str) -> str:
    """llguidance's message as one line: the quoted source excerpts dropped, lines joined."""
    lines = [line.strip() for line in message.replace("<non-verbose/>", "").splitlines()]
    return " ".join(line for line in lines if line and not _EXCERPT.fullmatch(line))


# ---- the vocabulary as llguidance sees it --------------------------------------------------


# SentencePiece puts "▁" in front of every text it encodes, so a continuation cannot be encoded
# alone: it is encoded behind this fence, a private-use character no merge crosses, then cut.
_FENCE = "\ue000"


class _Vocabulary:
    """What `llguidance.TokenizerWrapper` reads: every token's bytes, which ids are special, EOS
    and BOS, and a way to tokenize text. llguidance restricts the mask to the tokenizer's own
    tokens where the grammar forces text (so `{"name` is not spelt `{`, `"`, `n` …), so that
    tokenization must give exactly the bytes asked for, without a space prefix."""

    def __init__(self, tokenizer, n_vocab: int):
        n = min(n_vocab, tokenizer.vocab_size)
        stops = sorted(i for i in tokenizer.stop_ids if i < n)
        if not stops:
            raise ConstraintError("the vocabulary has no end-of-generation token, so constrained output could not end")
        # logits past the vocabulary (padded output layers) get empty tokens: never allowed
        self.tokens = [tokenizer.token_to_piece(i, special=True) for i in range(n)] + [b""] * (n_vocab - n)
        self.special_token_ids = [i for i in range(n) if _is_special(tokenizer, i, self.tokens[i])] + stops
        self.eos_token_id, self.bos_token_id = stops[0], tokenizer.bos_id
        self.stop_ids = stops
        self._special = frozenset(self.special_token_ids)
        self._tokenizer = weakref.ref(tokenizer)  # the cache below is keyed by the tokenizer, weakly
        self._fence = _fence(tokenizer) if tokenizer.add_space_prefix else 0

    def __call__(self, text: bytes) -> list[int]:
        """The tokens of `text` in the middle of a generation (llguidance passes valid UTF-8)."""
        return self._encode(text.decode("utf-8", "replace"))

    def _encode(self, text: str) -> list[int]:
        """Text only: a user-defined special token the tokenizer matches in it (`<tool_call>`,
        which no grammar text may produce) is spelt as its first character and the rest."""
        tokenizer = self._tokenizer()
        ids = tokenizer.encode(_FENCE + text if self._fence else text, add_special=False)[self._fence:]
        if not self._special.intersection(ids):
            return ids
        out = []
        for i in ids:
            if i in self._special:
                piece = self.tokens[i].decode("utf-8", "replace")
                out += self._encode(piece[:1]) + (self._encode(piece[1:]) if piece[1:] else [])
            else:
                out.append(i)
        return out


def _fence(tokenizer) -> int:
    """How many tokens the fence takes, checked to stand apart from the text behind it."""
    fence = tokenizer.encode(_FENCE, add_special=False)
    ids = tokenizer.encode(_FENCE + "a b", add_special=False)
    if ids[: len(fence)] != fence or b"".join(map(tokenizer.token_to_piece, ids[len(fence):])) != b"a b":
        raise ConstraintError(f"{tokenizer.path}: cannot encode text without SentencePiece's space prefix")
    return len(fence)


def _is_special(tokenizer, i: int, piece: bytes) -> bool:
    """llama.cpp's rule for llguidance: control and unknown tokens, and user-defined tokens
    written like `<...>` (command-r's `<|START_OF_TURN_TOKEN|>`), are not text."""
    attr = tokenizer.token_attr(i)
    if attr & (Attr.CONTROL | Attr.UNKNOWN):
        return True
    return bool(attr & Attr.USER_DEFINED) and piece.startswith(b"<") and piece.endswith(b">")


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def token_vocabulary(tokenizer, n_vocab: int):
    """llguidance's `LLTokenizer` for a tokenizer and logits width, built once (~0.2 s for 49k
    tokens: every piece rendered, the token trie built) and kept while the tokenizer lives."""
    _need_llguidance()
    with _vocabularies_lock:
        built = _vocabularies.setdefault(tokenizer, {})
        if n_vocab not in built:
            vocab = _Vocabulary(tokenizer, n_vocab)
            built[n_vocab] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), eos_token=vocab.stop_ids)
        return built[n_vocab]


# ---- one sequence --------------------------------------------------------------------------


class TokenMatcher:
    """One sequence's place in a constraint: the mask of tokens allowed next, and the tokens taken.

    `seconds` counts the time spent in llguidance (masks and advancing), for the mask time per
    token; `steps` the masks computed.
    """

    def __init__(self, constraint: Constraint, vocabulary, n_vocab: int):
        self.name = constraint.name
        self._matcher = llguidance.LLMatcher(vocabulary, constraint.spec, log_level=0, limits=_limits())
        self._eos = frozenset(vocabulary.eos_tokens)
        self._words = np.zeros((n_vocab + 31) // 32, np.int32)  # bit i % 32 of word i // 32: token i
        self.finished = False
        self.seconds, self.steps = 0.0, 0
        self._raise_if_failed()

    def mask(self) -> mx.array:
        """The tokens allowed next, as a ((n_vocab + 31) // 32,) uint32 bitmask (llguidance's layout)."""
        t0 = time.perf_counter()
        self._compute()
        words = mx.array(self._words.view(np.uint32))  # a copy: the buffer is reused next step
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return words

    def check(self) -> None:
        """Raise what the first `mask()` would (no text matches the constraint), without MLX:
        a server checks a request in another thread than the one that decodes it."""
        self._compute()

    def _compute(self) -> None:
        """The next mask into the buffer, checked."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self.steps == 0 and (self._matcher.is_error() or not self._allows_text()):
            raise ConstraintError(f"{self.name}: no text matches it")
        self._raise_if_failed()
        if not self._words.any():
            raise ConstraintError(f"{self.name}: no token can continue the output")

    def advance(self, token: int) -> None:
        """Take the sampled token (one the last mask allowed)."""
        t0 = time.perf_counter()
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"{self.name}: token {token} does not continue the output ({self._error()})")
        self.finished = token in self._eos
        self.seconds += time.perf_counter() - t0

    def _allows_text(self) -> bool:
        """Whether the first mask allows something other than EOS, or EOS at an accepting state:
        llguidance answers a language with no string at all (`[^\\x00-\\x{10FFFF}]`) with EOS
        alone, or with an error."""
        others = self._words.view(np.uint32).copy()
        for t in self._eos:
            others[t >> 5] &= ~np.uint32(1 << (t & 31))
        return bool(others.any()) or self._matcher.is_accepting()

    def _raise_if_failed(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError(f"{self.name}: {self._error()}")

    def _error(self) -> str:
        return one_line(self._matcher.get_error()) or "rejected"
