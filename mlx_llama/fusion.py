"""Projections that read the same input, fused into one matrix at load: q, k, v → attn_qkv (or,
where v's form differs from q's and k's, as in Q4_K_M files: q, k → attn_qk) and gate, up → ffn_up
([gate; up], as Phi-3's files hold them).

On a GPU a decoded token's time goes to reading the weights and to launching kernels; one
matrix-vector product instead of three (two) reads the same bytes with fewer launches and
larger kernels. Done where the parts share a form (all dense in one dtype, all affine with the
same bits and group size, or all the same block type) in every layer; the rows are stacked, so
the products are the same numbers.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from .architectures import ModelConfig

# (the layers' sublayer, its parts, the fused layer, the config's flag); q and k after q, k, v: alone
# where v did not join them (once q, k, v are fused, their parts are gone)
GROUPS = (("attn", ("attn_q", "attn_k", "attn_v"), "attn_qkv", "fused_qkv"),
          ("ffn", ("ffn_gate", "ffn_up"), "ffn_up", "fused_gate_up"),
          ("attn", ("attn_q", "attn_k"), "attn_qk", "fused_qk"))


def fuse(cfg: ModelConfig, weights: list, quantized: dict, blocks: dict, interleave: bool = False,
         ) -> tuple[ModelConfig, list]:
    """(cfg, weights) with every fusable group fused; `quantized` and `blocks` are updated in place.
    interleave: gate and up rows alternate in the fused ffn_up (gate_0, up_0, gate_1, …), so that one
    block of `cuda_affine`'s matvec computes a gate row and its up row and can write
    act(gate) · up itself (`cuda_affine.matvec(epilogue=…)`)."""
    arrays = dict(weights)
    for group, parts, fused, flag in GROUPS:
        paths = [[f"blk.{i}.{group}.{p}" for p in parts] for i in range(cfg.num_layers)]
        if getattr(cfg, flag) or any(f"{p}.weight" not in arrays for p in paths[0]):
            continue
        alternate = interleave and group == "ffn"
        if not all(_same_form(layer, quantized, blocks, arrays) for layer in paths):
            continue
        for i, layer in enumerate(paths):
            target = f"blk.{i}.{group}.{fused}"
            names = sorted({k[len(layer[0]) + 1:] for k in arrays if k.startswith(layer[0] + ".")})
            stacked = {f"{target}.{n}": _stack([arrays.pop(f"{p}.{n}") for p in layer], alternate) for n in names}
            mx.eval(list(stacked.values()))
            arrays.update(stacked)
            form = quantized.pop(layer[0], None) or blocks.pop(layer[0], None)
            for p in layer[1:]:
                quantized.pop(p, None), blocks.pop(p, None)
            if isinstance(form, dict):
                quantized[target] = form
            elif form is not None:
                blocks[target] = form
        biases = tuple(b for b in cfg.biases if b not in parts) + ((fused,) if parts[0] in cfg.biases else ())
        cfg = dataclasses.replace(cfg, biases=biases, **{flag: True})
        if alternate:
            cfg = dataclasses.replace(cfg, gate_up_interleaved=True)
    return cfg, list(arrays.items())


def _stack(parts: list[mx.array], alternate: bool) -> mx.array:
    """The parts' rows one after the other, or alternating (row i of each part, then row i + 1 …)."""
    if not alternate:
        return mx.concatenate(parts)
    return mx.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


def _same_form(paths: list[str], quantized: dict, blocks: dict, arrays: dict) -> bool:
    """The parts are all affine alike, all blocks of one type, or all dense of one dtype, and
    have a bias each or none."""
    forms = [quantized.get(p) or blocks.get(p) or arrays[p + ".weight"].dtype for p in paths]
    has_bias = {p + ".bias" in arrays for p in paths}
    return all(f == forms[0] for f in forms) and len(has_bias) == 1
