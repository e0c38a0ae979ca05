#!/usr/bin/env python3
"""Write tiny random GGUF files for tests, of every architecture mlx_llama runs.

    from make_fixture import make_tiny, make_tiny_llama
    make_tiny_llama("tiny.gguf", tensor_type="Q4_1", n_layers=2)
    make_tiny("qwen3.gguf", arch="qwen3", head_dim=32)

    python scripts/make_fixture.py OUT.gguf --type Q4_1 [--layers N --hidden H ...]

The model is a valid GGUF of its architecture (loadable by llama.cpp) with
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


# A small SentencePiece vocabulary, for files that must stay tiny (the fuzz test's ~100 KB file).
_TINY_WORDS = ("the of and to in is was he that it for on with as his at by had be not are from or this "
               "have an which one you were her all she there would their we him been has when who will more no "
               "if out so said what up its about into than them can only other new some could time these two "
               "may then do first any my now such like our over man me even most made after also did many").split()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tiny_vocab(path) -> Path:
    """A vocabulary-only GGUF (pass it as ``vocab_from``): a SentencePiece (``llama``) vocabulary
    of ~500 tokens — <unk>, <s>, </s>, the 256 byte tokens, printable ASCII, ``▁`` + common
    words and their prefixes, ChatML's two control tokens — and a ChatML chat template."""
    chars = [chr(c) for c in range(0x21, 0x7F)]
    # every prefix of each "▁word": SentencePiece's BPE reaches a word only through its pieces
    words = list(dict.fromkeys("\u2581" + w[:k] for w in _TINY_WORDS for k in range(1, len(w) + 1)))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", *chars, *words,
              "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * (1 + len(chars) + len(words)), 3, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 261)] + [0.0, 0.0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


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


# Per architecture: what its tiny files hold beyond Llama's tensors (see mlx_llama.architectures).
ARCH_DEFAULTS = {
    "llama": {},
    "qwen2": {"biases": ("attn_q", "attn_k", "attn_v")},
    "qwen3": {},
    "phi3": {"fused_qkv": True},
    "gemma3": {"sliding_window": 4, "swa_pattern": 3, "rope_base_swa": 10000.0, "rope_base": 1e6},
}
QK_NORM = ("qwen3", "gemma3")
SANDWICH = ("gemma3",)
FUSED_GATE_UP = ("phi3",)


def make_tiny_llama(path, **kw) -> Path:
    """A tiny ``llama`` file (see `make_tiny`)."""
    return make_tiny(path, arch="llama", **kw)


def make_tiny(
    path,
    *,
    arch: str = "llama",
    tensor_type="F32",
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    head_dim: int | None = None,
    rope_dims: int | None = None,
    vocab_from=None,
    tied: bool = True,
    seed: int = 0,
    rope_base: float | None = None,
    context_length: int = 256,
    extra_metadata: dict | None = None,
    rms_eps: float = 1e-5,
    embed_std: float = 0.25,
    biases: tuple = None,
    fused_qkv: bool | None = None,
    rope_freqs: bool = False,
    long_rope: bool = False,
    sliding_window: int | None = None,
    swa_pattern: int = 3,
    rope_base_swa: float = 10000.0,
    softcap: float = 0.0,
) -> Path:
    """Write a random tiny GGUF of architecture ``arch`` to ``path`` and return it as a ``Path``.

    ``head_dim``: an explicit head size (written as ``attention.key_length``; default hidden /
    heads); ``rope_dims``: rotate only that many dims of each head. ``biases``: the projections
    that get a bias (default per architecture: Qwen2's q/k/v). ``fused_qkv``: one ``attn_qkv``
    (default for phi3). ``rope_freqs``: Llama-3-style frequency factors (1 → 8 across the
    dims); ``long_rope``: Phi-3-style ``rope_factors_long``/``_short`` with an attention factor
    and an original context of half ``context_length`` (so the long factors apply).
    ``sliding_window``/``swa_pattern``/``rope_base_swa`` (gemma3: every ``swa_pattern``-th layer
    global), ``softcap``: final logit soft-capping. ``embed_std``: the embeddings' spread — larger
    gives peaked logits (the tied output projects with them).

    ``extra_metadata``: ``{key: value}`` added (or overriding) at the end; value types are
    inferred (bool, int -> UINT32 (INT32 if negative), float -> FLOAT32, str, list of those),
    or give ``(value, GGUFValueType)``; a value of ``None`` removes the key.
    """
    path = Path(path)
    opts = {**ARCH_DEFAULTS[arch]}
    biases = tuple(opts.get("biases", ())) if biases is None else tuple(biases)
    fused_qkv = opts.get("fused_qkv", False) if fused_qkv is None else fused_qkv
    sliding_window = opts.get("sliding_window", 0) if sliding_window is None else sliding_window
    rope_base = opts.get("rope_base", 10000.0) if rope_base is None else rope_base
    head_dim = head_dim or hidden // n_heads
    rope_dims = rope_dims or head_dim
    if n_heads % n_kv_heads or rope_dims % 2 or rope_dims > head_dim:
        raise ValueError("n_heads must be a multiple of n_kv_heads, rope_dims even and ≤ head_dim")

    vocab_path = str(Path(vocab_from) if vocab_from is not None else default_vocab_gguf())
    tok_fields = _tokenizer_fields(vocab_path)
    tokens = next((v for k, v, _, _ in tok_fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens")
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    tensors = _tensors(rng, arch, n_layers, hidden, n_heads * head_dim, n_kv_heads * head_dim, ffn, vocab,
                       head_dim, rope_dims, tied, embed_std, biases, fused_qkv, rope_freqs, long_rope)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"tiny {n_layers}L {hidden}h")  # no architecture in it: llama.cpp keys tokenizer quirks on names
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if head_dim != hidden // n_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(float(rope_base))
    w.add_layer_norm_rms_eps(float(rms_eps))
    w.add_vocab_size(vocab)
    if long_rope:
        w.add_rope_scaling_attn_factors(1.19)
        w.add_rope_scaling_orig_ctx_len(context_length // 2)
    if sliding_window:
        w.add_sliding_window(sliding_window)
        w.add_sliding_window_pattern(swa_pattern)
        w.add_rope_freq_base_swa(float(rope_base_swa))
    if softcap:
        w.add_final_logit_softcapping(float(softcap))
    main = tensor_type.get("default", tensor_type.get("*", "F32")) if isinstance(tensor_type, dict) else tensor_type
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
        _add_tensor(w, name, arr, tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _tensors(rng, arch, n_layers, hidden, q_dim, kv_dim, ffn, vocab, head_dim, rope_dims, tied, embed_std,
             biases, fused_qkv, rope_freqs, long_rope) -> list[tuple[str, np.ndarray]]:
    """The random tensors, numpy order (out_features, in_features); GGUF stores the reversed shape."""

    def mat(out_f, in_f, std=None):
        std = (1.0 / np.sqrt(in_f)) if std is None else std
        return (rng.standard_normal((out_f, in_f)) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.5 * rng.standard_normal(n)).astype(np.float32)

    tensors = [("token_embd.weight", mat(vocab, hidden, std=embed_std))]
    if rope_freqs:  # Llama-3.1's shape: high frequencies kept, low ones slowed down up to 8×
        tensors.append(("rope_freqs.weight", np.linspace(1.0, 8.0, rope_dims // 2).astype(np.float32)))
    if long_rope:
        tensors.append(("rope_factors_long.weight", np.linspace(1.0, 12.0, rope_dims // 2).astype(np.float32)))
        tensors.append(("rope_factors_short.weight", np.linspace(1.0, 1.5, rope_dims // 2).astype(np.float32)))
    attention = {"attn_qkv": (q_dim + 2 * kv_dim, hidden)} if fused_qkv else \
        {"attn_q": (q_dim, hidden), "attn_k": (kv_dim, hidden), "attn_v": (kv_dim, hidden)}
    attention["attn_output"] = (hidden, q_dim)
    mlp = {"ffn_up": (2 * ffn, hidden), "ffn_down": (hidden, ffn)} if arch in FUSED_GATE_UP else \
        {"ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors.append((p + "attn_norm.weight", norm(hidden)))
        for name, shape in attention.items():
            tensors.append((p + name + ".weight", mat(*shape)))
            if name in biases:
                tensors.append((p + name + ".bias", bias(shape[0])))
        if arch in QK_NORM:
            tensors += [(p + "attn_q_norm.weight", norm(head_dim)), (p + "attn_k_norm.weight", norm(head_dim))]
        if arch in SANDWICH:
            tensors.append((p + "post_attention_norm.weight", norm(hidden)))
        tensors.append((p + "ffn_norm.weight", norm(hidden)))
        for name, shape in mlp.items():
            tensors.append((p + name + ".weight", mat(*shape)))
            if name in biases:
                tensors.append((p + name + ".bias", bias(shape[0])))
        if arch in SANDWICH:
            tensors.append((p + "post_ffw_norm.weight", norm(hidden)))
    tensors.append(("output_norm.weight", norm(hidden)))
    if not tied:
        tensors.append(("output.weight", mat(vocab, hidden, std=embed_std)))
        if "output" in biases:
            tensors.append(("output.bias", bias(vocab)))
    return tensors


def _add_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, tensor_type) -> None:
    if arr.ndim == 1:
        w.add_tensor(name, arr)  # norms, biases, RoPE factors: F32
        return
    qt = _type_for(name, tensor_type)
    if qt == GGMLQuantizationType.F32:
        w.add_tensor(name, arr)
    elif qt == GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, quantize(arr, qt), raw_dtype=qt)


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
