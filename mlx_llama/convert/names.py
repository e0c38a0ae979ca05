"""Tensor names and layouts: GGUF's (`blk.3.attn_q.weight`) ↔ Hugging Face's, which mlx-lm keeps
(`model.layers.3.self_attn.q_proj.weight`), and what differs in the numbers themselves:

* `llama` files hold Q and K with each head's rows interleaved (llama.cpp's converter permutes
  them so that RoPE rotates adjacent pairs); Hugging Face keeps the halves apart (NEOX).
* Gemma's RMSNorm multiplies by 1 + w; its GGUF files hold 1 + w, its checkpoints w.
"""

from __future__ import annotations

import re

import numpy as np

# GGUF layer tensor → its module inside `model.layers.N`
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LAYERS = {
    "phi3": {**LAYER, "ffn_up": "mlp.gate_up_proj"},  # [gate; up] in one matrix
    "gemma3": {**LAYER, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Checkpoint entries that are no weights of the model (buffers saved by some exporters)
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _layer_table(arch: str) -> dict[str, str]:
    return LAYERS.get(arch, LAYER)


def hf_name(arch: str, gguf_name: str) -> str:
    """'blk.3.attn_q.weight' → 'model.layers.3.self_attn.q_proj.weight' (a suffix carried over)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_layer_table(arch)[parts[2]]}.{'.'.join(parts[3:])}"
    return f"{GLOBAL[parts[0]]}.{'.'.join(parts[1:])}"


def gguf_name(arch: str, name: str) -> str | None:
    """The inverse of `hf_name` for a module path or parameter name (None: not a GGUF tensor)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        rest = m.group(2)
        for gguf, hf in _layer_table(arch).items():
            if rest == hf or rest.startswith(hf + "."):
                return f"blk.{m.group(1)}.{gguf}{rest[len(hf):]}"
        return None
    for gguf, hf in GLOBAL.items():
        if name == hf or name.startswith(hf + "."):
            return gguf + name[len(hf):]
    return None


def is_permuted(arch: str, gguf_name: str) -> bool:
    """Whether the tensor's rows are in llama.cpp's interleaved RoPE order in a GGUF file."""
    return arch == "llama" and gguf_name.split(".")[2:3] in (["attn_q"], ["attn_k"])


def heads_of(cfg, gguf_name: str) -> int:
    return cfg.num_heads if ".attn_q." in gguf_name else cfg.num_kv_heads


def rows_to_gguf(n_heads: int, rows: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q/K: gguf = hf[index]. Each head's rows
    (2, head_dim/2) — the two halves RoPE pairs — become (head_dim/2, 2): adjacent pairs."""
    return np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def rows_to_hf(n_heads: int, rows: int) -> np.ndarray:
    """The inverse of `rows_to_gguf`: hf = gguf[index]."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def norm_offset(arch: str, gguf_name: str) -> float:
    """What the GGUF file adds to the checkpoint's value: 1 for Gemma's norm weights."""
    return 1.0 if arch == "gemma3" and gguf_name.endswith("norm.weight") else 0.0
