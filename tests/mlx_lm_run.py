"""Runs mlx-lm on model directories as its users do (`mlx_lm.load`, `mlx_lm.stream_generate`), for
the conversion tests; in its own process, as mlx-lm imports transformers (and torch where it is
installed), which the test process does without.

    python tests/mlx_lm_run.py SPEC.json OUT.npz

SPEC.json: a list of runs, {"dir": path, "tokens": [ids] or null, "prompt": [ids] or null,
"max_tokens": n, "float32": bool}. OUT.npz: for run i, `logits_i` (len(tokens), vocab) float32
from one teacher-forced forward pass, `generated_i` the greedy continuation of `prompt` (mlx-lm's
default sampler, stopping at the model's end-of-generation tokens). `float32`: the model's
float arrays cast to float32 first (MLX's CPU backend computes float16 slowly).
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np


def main(spec_path: str, out_path: str) -> None:
    from mlx_lm import load, stream_generate

    out = {}
    for i, run in enumerate(json.loads(open(spec_path).read())):
        model, tokenizer = load(run["dir"])
        if run.get("float32"):
            model.set_dtype(mx.float32)
        if run.get("tokens"):
            out[f"logits_{i}"] = np.array(model(mx.array([run["tokens"]]))[0].astype(mx.float32))
        if run.get("prompt"):
            steps = stream_generate(model, tokenizer, run["prompt"], max_tokens=run.get("max_tokens", 8))
            out[f"generated_{i}"] = np.array([s.token for s in steps if s.finish_reason != "stop"], dtype=np.int64)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
