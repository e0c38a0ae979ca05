"""Issue 16's acceptance figures for constrained generation, printed as tables.

1. JSON schemas: N generated schemas (nested objects, arrays, enums, bounded numbers, required
   and optional fields), one sampled answer each (temperature 0.8, seed = schema number), with
   the schema as a constraint and without; the rate of answers that parse and validate
   (`jsonschema`). Unconstrained answers are counted two ways: the whole answer, and the first
   JSON object or array found in it (after prose, or in a ```json fence).
2. Regex and grammar cases (dates, one-of labels, phone numbers, an arithmetic grammar in Lark
   and in GBNF): K sampled answers each, the rate that match.
3. Decoding speed with a JSON-schema constraint against none, alternating runs of the same
   length (end-of-generation ignored unconstrained, a schema that cannot end early
   constrained), with the matcher's time per token; and the process's CPU time per token, a
   figure a busy machine disturbs less than tokens/s (the mask's time counted in full, even
   where it overlaps the forward pass).

    python scripts/structured_acceptance.py [--schemas 50] [--cases 10] [--speed-runs 5] [-m FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time

import mlx_llama  # before mlx.core: preloads the fast BLAS
from mlx_llama import constraints
from mlx_llama.generation import GenerationStats, stream_generate

WORDS = ["name", "title", "city", "country", "color", "brand", "author", "genre", "status", "label",
         "code", "street", "team", "species", "language", "topic", "owner", "model"]
NUMBERS = ["age", "price", "score", "rating", "year", "count", "weight", "height", "quantity", "level"]
ENUMS = [["red", "green", "blue"], ["low", "medium", "high"], ["cat", "dog", "bird", "fish"],
         ["draft", "published", "archived"], ["small", "large"], ["north", "south", "east", "west"]]
LISTS = ["tags", "items", "members", "values", "keywords", "steps"]
OBJECTS = ["address", "owner", "details", "location", "stats", "meta"]


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema: 2–5 properties of mixed kinds, some required, objects closed."""
    props = {}
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"] + ["object"] * (depth < 2))
        name, schema = _property(rng, kind, depth)
        props.setdefault(name, schema)
    names = list(props)
    required = rng.sample(names, rng.randint(1, len(names)))
    return {"type": "object", "properties": props, "required": [n for n in names if n in required],
            "additionalProperties": False}


def _property(rng: random.Random, kind: str, depth: int) -> tuple[str, dict]:
    if kind == "string":
        return rng.choice(WORDS), {"type": "string", "maxLength": rng.choice([8, 16, 32])}
    if kind in ("integer", "number"):
        low = rng.choice([0, 1, 10, 1900, -50])
        return rng.choice(NUMBERS), {"type": kind, "minimum": low, "maximum": low + rng.choice([5, 100, 1000])}
    if kind == "boolean":
        return rng.choice(["active", "verified", "public", "done"]), {"type": "boolean"}
    if kind == "enum":
        return rng.choice(["kind", "priority", "category", "size", "direction"]), {"enum": rng.choice(ENUMS)}
    if kind == "array":
        item = rng.choice([{"type": "string", "maxLength": 16}, {"type": "integer", "minimum": 0, "maximum": 99},
                           {"enum": rng.choice(ENUMS)}] + [make_schema(rng, depth + 1)] * (depth < 2))
        low = rng.choice([0, 1, 2])
        return rng.choice(LISTS), {"type": "array", "items": item, "minItems": low, "maxItems": low + rng.choice([1, 3])}
    return rng.choice(OBJECTS), make_schema(rng, depth + 1)


def make_schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_schema(rng) for _ in range(n)]


def schema_prompt(schema: dict) -> str:
    return f"Write one JSON object that follows this JSON schema, with realistic values:\n{json.dumps(schema)}"


def first_json(text: str):
    """The first JSON object or array in an answer (after prose or a ```json fence), or None."""
    for m in list(re.finditer(r"[{\[]", text))[:3]:
        try:
            return json.JSONDecoder().raw_decode(text[m.start():])[0]
        except ValueError:
            continue
    return None


def valid(value, schema) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def json_rates(model, tok, schemas, temp: float, max_tokens: int, first: int = 0, free: bool = True) -> dict:
    """Per mode: answers valid, answers cut by max_tokens, tokens generated (free: the
    unconstrained answers too)."""
    modes = ("constrained", "whole", "first JSON") if free else ("constrained",)
    out = {m: {"valid": 0, "cut": 0, "tokens": 0} for m in modes}
    for i, schema in enumerate(schemas, first):
        for constrained in (True, False) if free else (True,):
            stats = GenerationStats()
            text = answer(model, tok, schema, i, temp, max_tokens, stats, constrained)
            for mode in ["constrained"] if constrained else ["whole", "first JSON"]:
                out[mode]["cut"] += stats.finish_reason == "length"
                out[mode]["tokens"] += stats.generated_tokens
            if constrained:
                ok = _parses_valid(text, schema)
                out["constrained"]["valid"] += ok
            else:
                out["whole"]["valid"] += _parses_valid(text, schema)
                value = first_json(text)
                ok = value is not None and valid(value, schema)
                out["first JSON"]["valid"] += ok
            print(f"schema {i:2d} {'constrained  ' if constrained else 'unconstrained'} {'ok ' if ok else 'BAD'} "
                  f"{stats.finish_reason:6} {stats.generated_tokens:3d} tokens {text[:80]!r}", flush=True)
    return out


AFTER_JSON = 8  # tokens generated after an unconstrained answer's first JSON value, to see if it ends there


def answer(model, tok, schema, seed: int, temp: float, max_tokens: int, stats, constrained: bool) -> str:
    """One sampled answer. Unconstrained, it is cut AFTER_JSON tokens after its first complete
    JSON value: what follows cannot change either count (the first value is known, and the
    whole answer is JSON only if it ends there), and small models ramble on to max_tokens."""
    text, after = "", None
    for piece in stream_generate(model, tok, schema_prompt(schema), max_tokens, chat=True, temp=temp, seed=seed,
                                 stats=stats, constraint=constraints.json_schema(schema) if constrained else None):
        text += piece
        if not constrained:
            if after is None and first_json(text) is not None:
                after = stats.generated_tokens
            if after is not None and stats.generated_tokens - after >= AFTER_JSON:
                stats.finish_reason = "cut after its JSON"
                break
    return text


def _parses_valid(text: str, schema: dict) -> bool:
    try:
        return valid(json.loads(text), schema)
    except ValueError:
        return False


ARITHMETIC_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
"""
ARITHMETIC_GBNF = r"""
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [0-9] [0-9]? [0-9]? [0-9]? | "(" expr ")"
"""


def is_arithmetic(text: str) -> bool:
    """Balanced brackets, 1–4 digit numbers between binary operators."""
    depth, operand = 0, True
    for token in re.findall(r"\d{1,4}|[-+*/()]|.", text):
        if token == "(" and operand:
            depth += 1
        elif token == ")" and not operand and depth:
            depth -= 1
        elif token.isdigit() and operand:
            operand = False
        elif token in "+-*/" and not operand:
            operand = True
        else:
            return False
    return depth == 0 and not operand


def pattern_check(pattern: str):
    return lambda text: re.fullmatch(pattern, text, re.ASCII) is not None


CASES = [  # name, prompt, constraint, check (written without llguidance)
    ("date", "When was the Eiffel Tower finished? Answer with the date.",
     lambda: constraints.regex(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
     pattern_check(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")),
    ("sentiment label", "Review: 'The food was cold and the waiter rude.' Sentiment?",
     lambda: constraints.regex("positive|negative|neutral"), pattern_check("positive|negative|neutral")),
    ("yes/no", "Is the sun a star?", lambda: constraints.regex("(Yes|No)\\."), pattern_check(r"(Yes|No)\.")),
    ("phone", "Give a US phone number.", lambda: constraints.regex(r"\(\d{3}\) \d{3}-\d{4}"),
     pattern_check(r"\(\d{3}\) \d{3}-\d{4}")),
    ("arithmetic (Lark)", "Write an arithmetic expression.", lambda: constraints.grammar(ARITHMETIC_LARK), is_arithmetic),
    ("arithmetic (GBNF)", "Write an arithmetic expression.", lambda: constraints.grammar(ARITHMETIC_GBNF), is_arithmetic),
]


def case_rates(model, tok, k: int, temp: float) -> list[tuple[str, int, int]]:
    rows = []
    for name, prompt, make, check in CASES:
        hits = 0
        for seed in range(k):
            text = "".join(stream_generate(model, tok, prompt, 64, chat=True, temp=temp, seed=seed, constraint=make()))
            hits += check(text)
            print(f"{name:18} seed {seed}: {'ok ' if check(text) else 'BAD'} {text!r}", flush=True)
        rows.append((name, hits, k))
    return rows


# A schema whose answers cannot end within the measured tokens: a long list of small records.
SPEED_SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"], "additionalProperties": False}}


def speed(model, tok, runs: int, tokens: int) -> dict:
    """Generation tok/s per mode over alternating runs, and the matcher's seconds per token."""
    prompt = "List people with their name and age as JSON."
    out = {"unconstrained": [], "JSON schema": [], "mask ms/token": [], "cpu unconstrained": [], "cpu JSON schema": []}
    for r in range(runs):
        for mode in ("unconstrained", "JSON schema"):
            stats = GenerationStats()
            constraint = constraints.json_schema(SPEED_SCHEMA) if mode == "JSON schema" else None
            # no stop tokens: every run is `tokens` long; CPU time (all threads) from the first token on
            cpu = None
            for _ in stream_generate(model, tok, prompt, tokens, chat=True, seed=r, stats=stats, stop_ids=set(),
                                     constraint=constraint):
                cpu = time.process_time() if cpu is None else cpu
            assert stats.generated_tokens == tokens, (mode, stats.generated_tokens)
            out[mode].append(stats.generation_tps)
            out[f"cpu {mode}"].append(1e3 * (time.process_time() - cpu) / (tokens - 1))
            if constraint is not None:
                out["mask ms/token"].append(1e3 * stats.constraint_seconds / stats.generated_tokens)
        print(f"run {r}: unconstrained {out['unconstrained'][-1]:.1f} tok/s, JSON schema {out['JSON schema'][-1]:.1f} "
              f"tok/s, mask {out['mask ms/token'][-1]:.3f} ms/token, CPU ms/token {out['cpu unconstrained'][-1]:.1f} "
              f"unconstrained, {out['cpu JSON schema'][-1]:.1f} JSON schema", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemas", type=int, default=50)
    ap.add_argument("--first", type=int, default=0, help="start at this schema (to split a run across processes)")
    ap.add_argument("--cases", type=int, default=10, help="sampled answers per regex/grammar case")
    ap.add_argument("--speed-runs", type=int, default=5)
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-n", "--max-tokens", type=int, default=384, help="per JSON answer")
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--constrained-only", action="store_true", help="skip the unconstrained answers (their rate)")
    args = ap.parse_args(argv)
    model, tok = mlx_llama.load(args.model)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")

    tables = []
    if args.schemas:
        rates = json_rates(model, tok, make_schemas(args.first + args.schemas)[args.first:], args.temp, args.max_tokens,
                           args.first, free=not args.constrained_only)
        lines = ["| answers | parse and validate | hit max tokens | tokens/answer |", "| --- | --- | --- | --- |"]
        for mode, r in rates.items():
            label = {"constrained": "with the schema as constraint", "whole": "unconstrained, whole answer",
                     "first JSON": "unconstrained, first JSON value in it"}[mode]
            lines.append(f"| {label} | {r['valid']}/{args.schemas} = {100 * r['valid'] / args.schemas:.0f}% | "
                         f"{r['cut']} | {r['tokens'] / args.schemas:.0f} |")
        tables.append("\n".join(lines))
    if args.cases:
        rows = case_rates(model, tok, args.cases, args.temp)
        tables.append("\n".join(["| case | match |", "| --- | --- |"] +
                                [f"| {name} | {hits}/{k} = {100 * hits / k:.0f}% |" for name, hits, k in rows]))
    if args.speed_runs:
        s = speed(model, tok, args.speed_runs, args.speed_tokens)
        med = {k: statistics.median(v) for k, v in s.items()}
        best = {k: max(v) for k, v in s.items() if k != "mask ms/token"}
        tables.append("\n".join([
            "| generation | median tok/s | best tok/s | mask ms/token (median) |", "| --- | --- | --- | --- |",
            f"| unconstrained | {med['unconstrained']:.1f} | {best['unconstrained']:.1f} | — |",
            f"| JSON schema | {med['JSON schema']:.1f} | {best['JSON schema']:.1f} | {med['mask ms/token']:.3f} |",
            f"| ratio | {med['JSON schema'] / med['unconstrained']:.2f}× | "
            f"{best['JSON schema'] / best['unconstrained']:.2f}× | |",
            "", "| process CPU time per token (median) | unconstrained | JSON schema | ratio (speed if CPU-bound) |",
            "| --- | --- | --- | --- |",
            f"| ms/token | {med['cpu unconstrained']:.1f} | {med['cpu JSON schema']:.1f} | "
            f"{med['cpu unconstrained'] / med['cpu JSON schema']:.2f}× |"]))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
