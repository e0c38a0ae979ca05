"""Batched decoding (`mlx_llama.batch`): sequences of different lengths share decode steps and
still get exactly their own tokens — greedy and seeded sampling, joining and leaving mid-way,
with and without a constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from mlx_llama import constraints
from mlx_llama.batch import Batch, Sequence
from mlx_llama.generation import GenerationStats, stream_tokens
from mlx_llama.prompt import encode_prompt, file_template
from mlx_llama.sample import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?"]
N = 8


@pytest.fixture(scope="module")
def prompts(smollm2):
    model, tokenizer = smollm2
    template = file_template(tokenizer)
    return [encode_prompt(tokenizer, q, template) for q in QUESTIONS]


def sequence(smollm2, prompt, params, max_tokens=N, stops=()):
    model, tokenizer = smollm2
    return Sequence(model, tokenizer, prompt.ids, max_tokens, params=params, cache=model.make_cache(),
                    stop_ids=prompt.stop_ids, stop_strings=stops)


def run(smollm2, rows: int, seqs: list[Sequence], joins: list[int]) -> list[str]:
    """Decode `seqs` in one batch of `rows`; sequence i joins after `joins[i]` steps. Their texts."""
    batch, texts, step = Batch(smollm2[0], rows), [""] * len(seqs), 0
    pending = list(range(len(seqs)))
    while pending or len(batch):
        for i in [i for i in pending if joins[i] <= step]:
            pending.remove(i)
            while (token := seqs[i].prefill()) is None:
                pass
            texts[i] += seqs[i].add(token)
            if not seqs[i].done:
                batch.add(seqs[i])
        for seq, token in batch.step():
            i = seqs.index(seq)
            texts[i] += seq.add(token)
            if seq.done:
                batch.remove(seq)
        step += 1
    return texts


def test_one_row_is_the_single_sequence_loop(smollm2, prompts):
    model, tokenizer = smollm2
    params = SamplingParams(temp=0)
    stats = GenerationStats()
    alone = "".join(stream_tokens(model, tokenizer, prompts[1].ids, N, params=params, cache=model.make_cache(),
                                  stats=stats, stop_ids=prompts[1].stop_ids))
    seq = sequence(smollm2, prompts[1], params)
    assert run(smollm2, 1, [seq], [0]) == [alone]
    assert seq.stats.sampled == stats.sampled and seq.stats.finish_reason == stats.finish_reason == "length"


# greedy batching is also checked over HTTP (test_server: 4 concurrent clients), so it runs with -m slow
@pytest.mark.parametrize("params", [pytest.param(SamplingParams(temp=0), id="greedy", marks=pytest.mark.slow),
                                    pytest.param(SamplingParams(temp=0.9, seed=3, repeat_penalty=1.2), id="seeded")])
def test_sequences_in_a_batch_get_their_own_tokens(smollm2, prompts, params):
    alone = [run(smollm2, 3, [sequence(smollm2, p, params)], [0])[0] for p in prompts]
    together = run(smollm2, 3, [sequence(smollm2, p, params) for p in prompts], joins=[0, 2, 5])
    assert together == alone
    assert len(set(alone)) == 3


def test_a_sequence_stops_at_its_own_limits(smollm2, prompts):
    params = SamplingParams(temp=0)
    short, stopped, ends = (sequence(smollm2, prompts[0], params, max_tokens=3),
                            sequence(smollm2, prompts[0], params, stops=["France"]),
                            sequence(smollm2, prompts[0], params, max_tokens=64))
    texts = run(smollm2, 3, [short, stopped, ends], [0, 0, 0])
    assert texts == ["The capital of", "The capital of ", "The capital of France is Paris."]
    assert [s.stats.finish_reason for s in (short, stopped, ends)] == ["length", "stop", "stop"]
    assert len(ends.stats.sampled) == len(ends.stats.tokens) + 1  # the end-of-turn token: sampled, not shown


# ---- under a constraint: each row its own mask and matcher -------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
          "required": ["city", "population"], "additionalProperties": False}


def constrained(smollm2, prompt, params, constraint, max_tokens=48):
    model, tokenizer = smollm2
    return Sequence(model, tokenizer, prompt.ids, max_tokens, params=params, cache=model.make_cache(),
                    stop_ids=prompt.stop_ids, matcher=constraint.matcher(tokenizer, model.config.vocab_size))


def test_one_constrained_row_is_the_constrained_loop(smollm2, prompts):
    """One row under a JSON schema: the tokens of `stream_tokens(constraint=…)`, ended by the
    matcher's end-of-generation token."""
    model, tokenizer = smollm2
    params, schema = SamplingParams(temp=0), constraints.json_schema(SCHEMA)
    stats = GenerationStats()
    alone = "".join(stream_tokens(model, tokenizer, prompts[0].ids, 48, params=params, cache=model.make_cache(),
                                  stats=stats, stop_ids=prompts[0].stop_ids, constraint=schema))
    seq = constrained(smollm2, prompts[0], params, schema)
    assert run(smollm2, 1, [seq], [0]) == [alone]
    assert seq.stats.sampled == stats.sampled and seq.stats.finish_reason == stats.finish_reason == "stop"
    assert seq.matcher.finished and json.loads(alone)["city"]


# constrained and free requests in one batch, greedy and seeded, are also checked over HTTP
# (test_server_structured), so this one (rows joining mid-way, a regex row) runs with -m slow
@pytest.mark.slow
@pytest.mark.parametrize("params", [pytest.param(SamplingParams(temp=0), id="greedy"),
                                    pytest.param(SamplingParams(temp=0.9, seed=5), id="seeded")])
def test_constrained_and_free_rows_share_a_batch(smollm2, prompts, params):
    """A JSON-schema row, a regex row and a free row, joining at different steps: each gets the
    tokens it gets alone, and the constrained ones match."""
    schema, words = constraints.json_schema(SCHEMA), constraints.regex(r"[0-9]{1,3}( [a-z]{1,10}){1,4}")

    def make():
        return [constrained(smollm2, prompts[0], params, schema), constrained(smollm2, prompts[2], params, words),
                sequence(smollm2, prompts[1], params)]

    alone = [run(smollm2, 3, [seq], [0])[0] for seq in make()]
    together = run(smollm2, 3, make(), joins=[1, 0, 3])
    assert together == alone
    jsonschema.validate(json.loads(together[0]), SCHEMA)
    assert re.fullmatch(r"[0-9]{1,3}( [a-z]{1,10}){1,4}", together[1]), together[1]
