#!/usr/bin/env python3
"""Write tiny random Llama GGUF files for tests.

    from make_fixture import make_tiny_llama
    make_tiny_llama("tiny.gguf", tensor_type="Q4_1", n_layers=2)

    python scripts/make_fixture.py OUT.gguf --type Q4_1 [--layers N --hidden H ...]

The model is a valid ``llama``-architecture GGUF (loadable by llama.cpp) with
random weights and the tokenizer metadata (all ``tokenizer.*`` keys) copied
from ``vocab_from`` (default: the SmolLM2-135M GGUF shipped by
the default model), so it can be run end to end.  The vocab size is the number of
tokens in that tokenizer.

``tensor_type`` chooses the storage type of the 2-D matrices (including
``token_embd`` / ``output``): one of F32, F16, BF16, Q4_0, Q4_1, Q8_0.  Either
a single name/``GGMLQuantizationType``, or a dict whose keys are (checked in
this order) a full tensor name (``"blk.0.attn_q.weight"``), a role with or
without ``.weight`` (``"attn_q"``, ``"token_embd"``, ``"output"``), or
``"default"``/``"*"``; matrices matched by nothing are F32.  Norm vectors are
always F32.  Quantized types need row widths (``hidden`` and ``ffn``) that are
multiples of 32.

Weights: matrices ~ N(0, 1/in_features) (so activations stay O(1)), token
embeddings ~ N(0, 0.25**2) (logit std ~ 0.25*sqrt(hidden) ~ 2 for hidden 64),
norm weights ~ 1 + N(0, 0.1**2).  Deterministic for a given ``seed``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import numpy as np
import gguf

from mlx_llama.gguf_file import GGUFFile
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import quantize

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")

# GGUF general.file_type (llama_ftype) values for the "mostly X" types
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def default_vocab_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF, the default model (downloaded once into the user's cache)."""
    from mlx_llama import default_model  # noqa: PLC0415

    return Path(default_model())


@functools.lru_cache(maxsize=8)
def _tokenizer_fields(path: str) -> tuple:
    """All ``tokenizer.*`` metadata of a GGUF as (key, value, vtype, sub_type) tuples."""
    f = GGUFFile(path)
    out = []
    for key, val in f.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        vtype, sub = f.types[key]
        if vtype == GGUFValueType.ARRAY:
            val = tuple(val)
        out.append((key, val, GGUFValueType(vtype), None if sub is None else GGUFValueType(sub)))
    return tuple(out)


def _norm_type(t) -> GGMLQuantizationType:
    if isinstance(t, GGMLQuantizationType):
        name = t.name
    else:
        name = str(t).upper()
    if name not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported tensor type {t!r}; choose from {SUPPORTED_TYPES}")
    return GGMLQuantizationType[name]


def _type_for(name: str, tensor_type) -> GGMLQuantizationType:
    if not isinstance(tensor_type, dict):
        return _norm_type(tensor_type)
    role = name[:-len(".weight")] if name.endswith(".weight") else name
    if role.startswith("blk."):
        role = role.split(".", 2)[2]
    for key in (name, role, role + ".weight", "default", "*"):
        if key in tensor_type:
            return _norm_type(tensor_type[key])
    return GGMLQuantizationType.F32


def make_tiny_llama(
    path,
    *,
    tensor_type="F32",
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab_from=None,
    tied: bool = True,
    seed: int = 0,
    rope_base: float = 10000.0,
    context_length: int = 256,
    extra_metadata: dict | None = None,
    rms_eps: float = 1e-5,
) -> Path:
    """Write a random tiny llama GGUF to ``path`` and return it as a ``Path``.

    ``extra_metadata``: ``{key: value}`` added (or overriding) at the end;
    value types are inferred (bool, int -> UINT32 (INT32 if negative),
    float -> FLOAT32, str, list of those), or give ``(value, GGUFValueType)``;
    a value of ``None`` removes the key (e.g. ``llama.attention.head_count_kv``).
    """
    path = Path(path)
    if hidden % n_heads:
        raise ValueError("hidden must be a multiple of n_heads")
    if n_heads % n_kv_heads:
        raise ValueError("n_heads must be a multiple of n_kv_heads")
    head_dim = hidden // n_heads
    if head_dim % 2:
        raise ValueError("head_dim must be even for RoPE")

    vocab_path = str(Path(vocab_from) if vocab_from is not None else default_vocab_gguf())
    tok_fields = _tokenizer_fields(vocab_path)
    tokens = next((v for k, v, _, _ in tok_fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens")
    vocab = len(tokens)

    rng = np.random.default_rng(seed)

    def mat(out_f, in_f, std=None):
        std = (1.0 / np.sqrt(in_f)) if std is None else std
        return (rng.standard_normal((out_f, in_f)) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # numpy order (out_features, in_features); GGUF stores the reversed shape
    tensors: list[tuple[str, np.ndarray]] = []
    tensors.append(("token_embd.weight", mat(vocab, hidden, std=0.25)))
    kv_dim = n_kv_heads * head_dim
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", norm(hidden)),
            (p + "attn_q.weight", mat(hidden, hidden)),
            (p + "attn_k.weight", mat(kv_dim, hidden)),
            (p + "attn_v.weight", mat(kv_dim, hidden)),
            (p + "attn_output.weight", mat(hidden, hidden)),
            (p + "ffn_norm.weight", norm(hidden)),
            (p + "ffn_gate.weight", mat(ffn, hidden)),
            (p + "ffn_up.weight", mat(ffn, hidden)),
            (p + "ffn_down.weight", mat(hidden, ffn)),
        ]
    tensors.append(("output_norm.weight", norm(hidden)))
    if not tied:
        tensors.append(("output.weight", mat(vocab, hidden, std=0.25)))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"tiny-llama-{n_layers}L-{hidden}h")
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_base))
    w.add_layer_norm_rms_eps(float(rms_eps))
    w.add_vocab_size(vocab)
    if isinstance(tensor_type, dict):
        main = tensor_type.get("default", tensor_type.get("*", "F32"))
    else:
        main = tensor_type
    w.add_file_type(_FILE_TYPE[_norm_type(main).name])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for key, val, vtype, sub in tok_fields:
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, list(val), vtype, sub_type=sub)
        else:
            w.add_key_value(key, val, vtype)

    for key, val in (extra_metadata or {}).items():
        for kv in w.kv_data:  # override silently (the writer would warn)
            kv.pop(key, None)
        if val is not None:  # None: just drop the key (e.g. to test defaults)
            _add_extra(w, key, val)

    for name, arr in tensors:
        if arr.ndim == 1:
            w.add_tensor(name, arr)  # norms: F32
            continue
        qt = _type_for(name, tensor_type)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qt == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qt), raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _add_extra(w: gguf.GGUFWriter, key: str, val) -> None:
    if isinstance(val, tuple) and len(val) == 2 and isinstance(val[1], GGUFValueType):
        val, vtype = val
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = _infer_vtype(val[0]) if val else GGUFValueType.INT32
        w.add_key_value(key, val, vtype, sub_type=sub)
        return
    if isinstance(val, (list, tuple)):
        sub = _infer_vtype(val[0]) if val else GGUFValueType.INT32
        w.add_key_value(key, list(val), GGUFValueType.ARRAY, sub_type=sub)
        return
    w.add_key_value(key, val, _infer_vtype(val))


def _infer_vtype(val) -> GGUFValueType:
    if isinstance(val, bool):
        return GGUFValueType.BOOL
    if isinstance(val, (int, np.integer)):
        return GGUFValueType.INT32 if val < 0 else GGUFValueType.UINT32
    if isinstance(val, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(val, str):
        return GGUFValueType.STRING
    raise TypeError(f"cannot infer GGUF type of {val!r}; pass (value, GGUFValueType)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--type", default="F32", choices=SUPPORTED_TYPES, help="matrix storage type")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--vocab-from", default=None, help="GGUF to copy tokenizer.* metadata from")
    ap.add_argument("--untied", action="store_true", help="write a separate output.weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--context-length", type=int, default=256)
    a = ap.parse_args(argv)
    out = make_tiny_llama(
        a.out, tensor_type=a.type, n_layers=a.layers, hidden=a.hidden, n_heads=a.heads,
        n_kv_heads=a.kv_heads, ffn=a.ffn, vocab_from=a.vocab_from, tied=not a.untied,
        seed=a.seed, rope_base=a.rope_base, context_length=a.context_length,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
