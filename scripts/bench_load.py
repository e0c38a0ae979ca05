"""Load time and peak RSS of a Llama-2-7B-shaped GGUF: mlx_llama (Q4_K_M) against `mx.load` (Q4_0).

Random-weight files of the 7B shape are written first (valid blocks: random quants, finite
float16 scales), in llama.cpp's Q4_K_M recipe (Q6_K for the output, attn_v and half the
ffn_down layers, Q4_K elsewhere) and in Q4_0. Each load runs in its own process so its peak
RSS is its own; mlx_llama keeps the weights quantized (`cpu_dequantize=False`).

    python scripts/bench_load.py [--dir /tmp/bench7b] [--layers 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

T_Q4_0, T_Q4_K, T_Q6_K, T_F32 = 2, 12, 14, 0
BLOCK = {T_Q4_0: (32, 18), T_Q4_K: (256, 144), T_Q6_K: (256, 210), T_F32: (1, 4)}
# byte offsets of the float16 fields in each block type (the rest may be any bits), and their
# values: weights then reach about ±0.02, as in a real 7B model, and average ~0 (Q4_K: the min
# scale dmin = 7.5 d, so that d·sc·q − dmin·m is centred for random 6-bit sc, m and 4-bit q; with
# dmin = d every weight leaned positive, and float16 activations overflowed by layer 21 of 32)
F16_FIELDS = {T_Q4_0: (0,), T_Q4_K: (0, 2), T_Q6_K: (208,)}
F16_VALUE = {T_Q4_0: (0.002,), T_Q4_K: (2e-5, 1.5e-4), T_Q6_K: (5e-6,)}


def random_blocks(rng, rows: int, cols: int, qtype: int) -> np.ndarray:
    block, size = BLOCK[qtype]
    if qtype == T_F32:  # norm weights
        return 1 + 0.1 * rng.standard_normal((rows, cols), dtype=np.float32)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off, value in zip(F16_FIELDS[qtype], F16_VALUE[qtype]):
        raw[..., off : off + 2] = np.full(raw.shape[:-1], value, np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def make_7b(path: str, recipe: str, layers: int, vocab_from: str | None) -> None:
    import gguf

    d, ffn, vocab = 4096, 11008, 32000
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama", use_temp_file=True)
    for key, value in dict(context_length=4096, embedding_length=d, block_count=layers, feed_forward_length=ffn).items():
        w.add_uint32(f"llama.{key}", value)
    w.add_uint32("llama.attention.head_count", 32)
    w.add_uint32("llama.attention.head_count_kv", 32)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    if vocab_from:  # a real 32000-token SentencePiece vocabulary, so the file loads end to end
        r = gguf.GGUFReader(vocab_from)
        for key, f in r.fields.items():
            if key.startswith("tokenizer."):
                sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    else:  # no tokenizer: the vocabulary size says how many rows the embedding has
        w.add_uint32("llama.vocab_size", vocab)

    def kind(name: str, i: int) -> int:
        if recipe == "Q4_0":
            return T_Q4_0
        if name == "output" or name == "attn_v" or (name == "ffn_down" and i % 2 == 0):
            return T_Q6_K
        return T_Q4_K

    def add(name, rows, cols, qtype):
        data = random_blocks(rng, rows, cols, qtype)
        if qtype == T_F32:  # norm weights: vectors
            w.add_tensor(name, data.reshape(-1))
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))

    add("token_embd.weight", vocab, d, T_Q4_0 if recipe == "Q4_0" else T_Q4_K)
    add("output_norm.weight", 1, d, T_F32)
    add("output.weight", vocab, d, kind("output", 0))
    for i in range(layers):
        b = f"blk.{i}."
        for name, rows, cols in (("attn_q", d, d), ("attn_k", d, d), ("attn_v", d, d), ("attn_output", d, d),
                                 ("ffn_gate", ffn, d), ("ffn_up", ffn, d), ("ffn_down", d, ffn)):
            add(b + name + ".weight", rows, cols, kind(name, i))
        add(b + "attn_norm.weight", 1, d, T_F32)
        add(b + "ffn_norm.weight", 1, d, T_F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def worker(engine: str, path: str) -> None:
    t0 = time.perf_counter()
    if engine == "mlx_llama":
        import mlx_llama
        import mlx.core as mx
        from mlx.utils import tree_flatten

        model, _ = mlx_llama.load(path, cpu_dequantize=False)
        held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    else:
        import mlx.core as mx

        arrays = mx.load(path)
        mx.eval(arrays)
        held = sum(v.nbytes for v in arrays.values())
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(engine=engine, seconds=seconds, peak_rss=rss, mlx_bytes=held)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab-from", default=os.path.join(os.path.dirname(__file__), "..", "tests", ".cache", "vocab", "ggml-vocab-llama-spm.gguf"))
    ap.add_argument("--keep", action="store_true", help="keep the files (they are reused when present)")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    os.makedirs(args.dir, exist_ok=True)
    vocab_from = args.vocab_from if os.path.exists(args.vocab_from) else None
    files = {}
    for recipe in ("Q4_K_M", "Q4_0"):
        path = os.path.join(args.dir, f"llama2-7b-shape-random-{recipe}-{args.layers}l.gguf")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            make_7b(path, recipe, args.layers, vocab_from)
            print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s", flush=True)
        files[recipe] = path
    results = {}
    for engine, recipe in (("mlx_llama", "Q4_K_M"), ("mx.load", "Q4_0")):
        out = subprocess.run([sys.executable, __file__, "--worker", engine, files[recipe]], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["file_size"] = os.path.getsize(files[recipe])
        results[engine] = r
        print(f"{engine:10} {recipe:7} file {r['file_size'] / 2**30:5.2f} GiB | load {r['seconds']:6.1f} s | peak RSS "
              f"{r['peak_rss'] / 2**30:5.2f} GiB ({r['peak_rss'] / r['file_size']:.2f}× file) | MLX arrays {r['mlx_bytes'] / 2**30:5.2f} GiB "
              f"({r['mlx_bytes'] / r['file_size']:.2f}× file)", flush=True)
    a, b = results["mlx_llama"], results["mx.load"]
    print(f"ratio mlx_llama/mx.load: load time {a['seconds'] / b['seconds']:.2f}×, peak RSS {a['peak_rss'] / b['peak_rss']:.2f}×")
    if not args.keep:
        for p in files.values():
            os.remove(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
