#!/usr/bin/env python3
"""Real llama.cpp-quantized blocks of every K-quant / IQ4 type, for `tests/test_quants.py`.

gguf-py can dequantize Q2_K … IQ4_XS but not quantize them, so the decoder tests need blocks
made by llama.cpp. This script re-quantizes SmolLM2-135M-Instruct (the default model, Q4_1)
once with `llama_model_quantize`, forcing one tensor to each type with tensor-type overrides
(only those tensors pay for llama.cpp's slow searches: ~3 s in all), and keeps a few rows of
each: `ROWS` rows spread over the tensor, the first `COLS` weights of each.

Writes `tests/golden/quant_fixtures.npz` (one uint8 array of blocks, (rows, bytes), per type;
~40 KB) and `tests/golden/quant_fixtures.json` (where each came from). Deterministic: the same
llama_cpp build gives the same bytes.

Usage:  python3 scripts/make_quant_fixtures.py [--out-dir tests/golden]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ROWS = 16
COLS = 512  # two 256-weight super-blocks, or sixteen 32-weight blocks

# type → the tensor forced to it. ffn_down's rows (1536) are a multiple of 256, the others (576) not.
OVERRIDES = {
    "Q2_K": "blk.0.ffn_down.weight",
    "Q3_K": "blk.1.ffn_down.weight",
    "Q4_K": "blk.2.ffn_down.weight",
    "Q5_K": "blk.3.ffn_down.weight",
    "Q6_K": "blk.4.ffn_down.weight",
    "IQ4_XS": "blk.5.ffn_down.weight",
    "IQ4_NL": "blk.0.attn_q.weight",
    "Q5_0": "blk.0.attn_k.weight",
    "Q5_1": "blk.0.attn_v.weight",
}


def requantize(src: str, dst: str, overrides: dict[str, str], ftype: str = "Q8_0") -> None:
    """`src` → `dst` with llama.cpp: `ftype` everywhere except tensors matching an override pattern
    (a regex) → that type. Used by the tests too."""
    import gguf
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.allow_requantize = True
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # NULL-terminated
    for i, (pattern, qtype) in enumerate(overrides.items()):
        table[i].pattern = pattern.encode()
        table[i].type = int(gguf.GGMLQuantizationType[qtype])
    if overrides:
        p.tt_overrides = table
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "golden"))
    args = ap.parse_args()

    import llama_cpp

    from mlx_llama import default_model
    from mlx_llama.gguf_file import GGUFFile
    from mlx_llama.quants import type_name

    src = default_model()
    arrays, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "mixed.gguf")
        requantize(src, dst, {"^" + name.replace(".", r"\.") + "$": t for t, name in OVERRIDES.items()})
        f = GGUFFile(dst)
        for qtype, name in OVERRIDES.items():
            t = f.tensors[name]
            got = type_name(t.ggml_type)
            if got != qtype:
                raise SystemExit(f"{name} came out {got}, not {qtype}")
            rows, cols = t.shape
            data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
            row_ids = np.linspace(0, rows - 1, ROWS).round().astype(int)
            n_bytes = data.shape[1] * COLS // cols
            arrays[qtype] = np.ascontiguousarray(data[row_ids, :n_bytes])
            meta[qtype] = {"tensor": name, "tensor_shape": [rows, cols],
                           "rows": f"numpy.linspace(0, {rows - 1}, {ROWS}).round()", "cols": f"0:{COLS}"}

    os.makedirs(args.out_dir, exist_ok=True)
    # Fixed zip timestamps so that re-running gives byte-identical files.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, arrays[key], allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, arr.getvalue())
    with open(os.path.join(args.out_dir, "quant_fixtures.npz"), "wb") as fh:
        fh.write(buf.getvalue())
    info = {
        "generator": "scripts/make_quant_fixtures.py",
        "llama_cpp_version": llama_cpp.__version__,
        "source_model": os.path.basename(src),
        "description": "uint8 blocks (rows, bytes) of real llama.cpp-quantized tensors: the first "
                       f"{COLS} weights of {ROWS} rows spread over one tensor per type (ftype Q8_0, "
                       "that tensor forced to the type with a tensor-type override)",
        "types": meta,
    }
    with open(os.path.join(args.out_dir, "quant_fixtures.json"), "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {len(arrays)} types to {args.out_dir}/quant_fixtures.{{npz,json}} "
          f"({len(buf.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
