"""How often a sampled chat answer contains a string: mlx_llama against llama.cpp, same rendered prompt.

With llama.cpp's default sampler (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) a small
model's answers vary from seed to seed. This script renders the question once with the file's
chat template (mlx_llama's renderer, as `mlx_llama generate` does), then samples N answers from
each engine on those same token ids and counts the answers containing the expected text: the two
rates should agree within sampling noise (a binomial standard error is printed).

    python scripts/answer_rate.py ["What is the capital of Germany?"] [--expect Berlin] [-N 40] [-m FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import mlx_llama  # before mlx.core: preloads the fast BLAS
from mlx_llama.chat_template import template_for
from mlx_llama.prompt import encode_prompt
from mlx_llama import default_model
from mlx_llama.generation import stream_generate
from mlx_llama.sample import SamplingParams


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", default="What is the capital of Germany?")
    ap.add_argument("--expect", default="Berlin")
    ap.add_argument("-N", type=int, default=40, help="answers per engine (seeds 0..N-1)")
    ap.add_argument("-n", "--max-tokens", type=int, default=256)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: the default model)")
    args = ap.parse_args(argv)
    args.model = args.model or default_model()

    from llama_cpp import Llama

    model, tokenizer = mlx_llama.load(args.model)
    template = template_for(tokenizer.metadata)
    prompt = encode_prompt(tokenizer, args.question, template)
    ids, stops = prompt.ids, prompt.stop_ids
    p = SamplingParams()
    llm = Llama(args.model, n_ctx=len(ids) + args.max_tokens, n_threads=os.cpu_count(), verbose=False)

    hits = {"mlx_llama": 0, "llama.cpp": 0}
    for seed in range(args.N):
        ours = "".join(stream_generate(model, tokenizer, ids, args.max_tokens, stop_ids=stops, **(vars(p) | {"seed": seed})))
        theirs = llm.create_completion(
            ids, max_tokens=args.max_tokens, temperature=p.temp, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
            repeat_penalty=p.repeat_penalty, seed=seed,
        )["choices"][0]["text"]
        hits["mlx_llama"] += args.expect in ours
        hits["llama.cpp"] += args.expect in theirs
        print(f"{seed:3d}  ours {ours[:60]!r:66}  llama.cpp {theirs[:60]!r}", flush=True)

    print(f"\nprompt: {len(ids)} tokens ({template.name} template); answers containing {args.expect!r}, {args.N} seeds each:")
    for name, k in hits.items():
        rate = k / args.N
        print(f"  {name:9} {k}/{args.N} = {100 * rate:.0f}% ± {100 * math.sqrt(rate * (1 - rate) / args.N):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
