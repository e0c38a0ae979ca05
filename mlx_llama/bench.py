"""Prompt and generation speed of a model, measured as llama.cpp's llama-bench measures them.

pp N: N random tokens prefilled into an empty cache (one pass, no sampling); tg N: N tokens
generated greedily after a one-token prompt, with `generation.generate_tokens` (the decode loop
`mlx_llama generate` uses). Each test runs once to warm up (compiling kernels, filling caches),
then `reps` times; tokens/s is given as mean ± sample standard deviation over the repetitions.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .generation import generate_tokens, prefill
from .sample import SamplingParams


@dataclass
class Result:
    test: str  # "pp512", "tg128"
    tokens: int
    seconds: list[float]

    @property
    def rates(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rates)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.rates) if len(self.rates) > 1 else 0.0


def time_prompt(model, tokens: list[int]) -> float:
    cache = model.make_cache()
    ids = mx.array(tokens, mx.int32)
    mx.eval(ids)
    t0 = time.perf_counter()
    mx.eval(prefill(model, ids, cache), [c.state for c in cache])
    return time.perf_counter() - t0


def time_generation(model, n: int, first: int) -> float:
    it = generate_tokens(model, [first], SamplingParams(temp=0), n + 1)
    next(it)  # the one-token prompt's pass is not generation
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    assert count == n
    return time.perf_counter() - t0


def run(model, prompt: int = 512, gen: int = 128, reps: int = 3, seed: int = 0) -> list[Result]:
    """The pp and tg tests (a size of 0 skips one), each warmed up once and run `reps` times."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    results = []
    if prompt:
        tokens = rng.integers(0, vocab, prompt).tolist()
        times = [time_prompt(model, tokens) for _ in range(reps + 1)][1:]
        results.append(Result(f"pp{prompt}", prompt, times))
    if gen:
        first = int(rng.integers(0, vocab))
        times = [time_generation(model, gen, first) for _ in range(reps + 1)][1:]
        results.append(Result(f"tg{gen}", gen, times))
    return results


def format_table(results: list[Result], model_desc: dict) -> str:
    """A llama-bench-style table: model, size, params, backend, test, t/s."""
    rows = [("model", "size", "params", "backend", "test", "t/s")]
    for r in results:
        rows.append((model_desc["name"], f"{model_desc['size'] / 2**30:.2f} GiB", _params(model_desc["params"]),
                     model_desc["backend"], r.test, f"{r.mean:.2f} ± {r.sd:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = lambda row: "| " + " | ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"  # noqa: E731
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i >= 4 else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def describe_model(f, model) -> dict:
    """What llama-bench prints of a model: its name, tensor bytes, parameters, types, device."""
    from .quants import type_name

    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[type_name(t.ggml_type)] = types.get(type_name(t.ggml_type), 0) + 1
    return {
        "name": f"{model.config.architecture} {_params(sum(math.prod(t.shape) for t in f.tensors.values()))}",
        "size": sum(t.data.nbytes for t in f.tensors.values()),
        "params": sum(math.prod(t.shape) for t in f.tensors.values()),
        "types": types,
        "backend": f"MLX {mx.default_device().type.name}" + (" (CUDA)" if mx.default_device() == mx.gpu and mx.cuda.is_available() else ""),
    }


def describe_converted(model) -> dict:
    """`describe_model` for a converted directory: the sizes of the arrays the model holds."""
    from mlx.utils import tree_flatten

    arrays = [a for _, a in tree_flatten(model.parameters())]
    return {"name": model.config.architecture, "size": sum(a.nbytes for a in arrays), "params": 0, "types": {},
            "backend": f"MLX {mx.default_device().type.name}"}
