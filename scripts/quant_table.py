"""Issue 4's table: SmolLM2 re-quantized by llama.cpp into each GGUF type, scored three ways.

For each type: llama.cpp's `llama_model_quantize` (allow_requantize) makes the file from the
Q4_1 original; then over the first N chunks of botchan.txt (ctx 512, llama.cpp's method):
  ours      `mlx_llama` as loaded (CPU mode: our decoders, weights expanded to float32),
  exact     the same Llama graph with weights from `gguf.quants.dequantize` in float32,
  llama.cpp its own logits (`logits_all`), which quantize activations to 8 bits on the CPU;
and over 64 tokens, our logits with the weights kept in compact (quantized) form against the
exact reference: top-1 equal except where the reference's top-2 gap is < 1e-2.

    python scripts/quant_table.py [--chunks 40] [--types Q4_0,Q6_K] [--text botchan.txt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import mlx_llama  # before mlx.core: preloads the fast BLAS
import gguf
import mlx.core as mx
import numpy as np

from mlx_llama import default_model
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.loader import load_model
from mlx_llama.model import module_path
from mlx_llama.perplexity import chunk_nll

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]


def requantize(src: str, dst: str, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {kind}")


def exact_reference(path: str):
    """Our Llama graph, dense float32, with every weight from gguf's own dequantizer."""
    f = GGUFFile(path)
    model = load_model(f, cpu_dequantize=True, dtype=mx.float32)
    reader = gguf.GGUFReader(path)
    weights = [
        (module_path(t.name), mx.array(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))))
        for t in reader.tensors
    ]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def ppl_mlx(model, chunks: list[list[int]]) -> float:
    nll = np.concatenate([np.array(chunk_nll(model, c), dtype=np.float64) for c in chunks])
    return math.exp(nll.mean())


def llama_cpp_scores(path: str, chunks: list[list[int]]):
    """llama.cpp's perplexity over the chunks, and its argmax at every scored position."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=len(chunks[0]), n_batch=512, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    nll, argmax = [], []
    for c in chunks:
        llm.reset()
        llm.eval(c)
        logits = np.array(llm.scores[: len(c)], dtype=np.float64)
        first = len(c) // 2
        rows = logits[first:-1]
        lse = rows.max(-1) + np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1))
        nll.append(lse - rows[np.arange(len(rows)), c[first + 1 :]])
        argmax.append(rows.argmax(-1))
    return math.exp(np.concatenate(nll).mean()), np.concatenate(argmax)


def our_argmax(model, chunks):
    out = []
    for c in chunks:
        h = model.hidden(mx.array([c]))
        out.append(np.array(mx.argmax(model.logits(h[:, len(c) // 2 : -1]), axis=-1)[0]))
    return np.concatenate(out)


def compact_exactness(path: str, reference, tokens: list[int]) -> dict:
    """Compact (quantized) weights vs the exact reference over `tokens`."""
    compact = load_model(GGUFFile(path), cpu_dequantize=False, dtype=mx.float32)
    ours = np.array(compact(mx.array([tokens]))[0])
    ref = np.array(reference(mx.array([tokens]))[0])
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    differ = ours.argmax(-1) != ref.argmax(-1)
    return {"top1_mismatch_at_gap>=1e-2": int((differ & (gap >= 1e-2)).sum()), "max_abs_dlogit": float(np.abs(ours - ref).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--text", default=None, help="botchan.txt (default: from the sentencepiece sdist in /tmp/dl)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--compact-only", action="store_true", help="only the compact-form check over 64 tokens (no perplexities)")
    args = ap.parse_args(argv)
    args.model = args.model or default_model()

    text_path = args.text or "/tmp/dl/sentencepiece-0.2.3/test/botchan.txt"
    with open(text_path, encoding="utf-8", errors="replace", newline="") as fh:
        text = fh.read()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            t0 = time.perf_counter()
            path = os.path.join(tmp, f"smollm2-{kind}.gguf")
            requantize(args.model, path, kind)
            ours_model, tokenizer = mlx_llama.load(path)
            tokens = tokenizer.encode(text, add_special=True)
            n = min(args.chunks, len(tokens) // args.ctx)
            chunks = [tokens[i * args.ctx : (i + 1) * args.ctx] for i in range(n)]
            if tokenizer.add_bos:
                for c in chunks:
                    c[0] = tokenizer.bos_id
            reference = exact_reference(path)
            row = {"type": kind, "file_types": sorted({gguf.GGMLQuantizationType(t.ggml_type).name for t in GGUFFile(path).tensors.values()})}
            if args.compact_only:
                row |= compact_exactness(path, reference, chunks[0][:64])
                print(f"{kind:8} compact: max|Δ| {row['max_abs_dlogit']:.2e}, top-1 misses {row['top1_mismatch_at_gap>=1e-2']}  "
                      f"[{', '.join(row['file_types'])}]", flush=True)
                continue
            row["ppl_ours"] = ppl_mlx(ours_model, chunks)
            row["ppl_exact"] = ppl_mlx(reference, chunks)
            row["ppl_llama_cpp"], llama_argmax = llama_cpp_scores(path, chunks)
            row["top1_vs_llama_cpp"] = float((our_argmax(ours_model, chunks) == llama_argmax).mean())
            row |= compact_exactness(path, reference, chunks[0][:64])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(
                f"{kind:8} ours {row['ppl_ours']:.4f}  exact {row['ppl_exact']:.4f} ({100 * (row['ppl_ours'] / row['ppl_exact'] - 1):+.3f}%)  "
                f"llama.cpp {row['ppl_llama_cpp']:.4f} ({100 * (row['ppl_ours'] / row['ppl_llama_cpp'] - 1):+.2f}%)  "
                f"top-1 vs llama.cpp {100 * row['top1_vs_llama_cpp']:.1f}%  compact: max|Δ| {row['max_abs_dlogit']:.2e}, "
                f"top-1 misses {row['top1_mismatch_at_gap>=1e-2']}  [{', '.join(row['file_types'])}]  {row['seconds']:.0f}s",
                flush=True,
            )
            del ours_model, reference
    print(f"\n{n} chunks of {args.ctx} tokens of {os.path.basename(text_path)}\n")
    print("| type | tensor types in file | PPL ours | PPL exact ref | PPL llama.cpp | ours vs exact | ours vs llama.cpp | top-1 vs llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['type']} | {', '.join(r['file_types'])} | {r['ppl_ours']:.4f} | {r['ppl_exact']:.4f} | {r['ppl_llama_cpp']:.4f} | "
            f"{100 * (r['ppl_ours'] / r['ppl_exact'] - 1):+.3f}% | {100 * (r['ppl_ours'] / r['ppl_llama_cpp'] - 1):+.2f}% | {100 * r['top1_vs_llama_cpp']:.1f}% |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
