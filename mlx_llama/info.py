"""`mlx_llama info`: what a GGUF file holds, read from its header alone (no weights decoded)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict

from .architectures import check_tensors, read_config, settings
from .errors import GGUFError
from .gguf_file import GGUFFile

SHOWN_KEYS = ("general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")


def _summary(value):
    """Long arrays (token lists, scores) are summarised instead of printed."""
    if isinstance(value, (list, tuple)) and len(value) > 16:
        return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, …]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"… ({len(value)} chars)"
    return value


def describe(path, all_metadata: bool = False) -> dict:
    from .quants import type_name
    from .quants.formats import format_for

    f = GGUFFile(path)
    md = f.metadata
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "mlx": ""})
    n_params = 0
    for t in f.tensors.values():
        row = by_type[type_name(t.ggml_type)]
        row["tensors"] += 1
        row["bytes"] += int(t.data.nbytes)
        fmt = format_for(t.ggml_type)  # on this device (Q2_K/Q6_K: the blocks, or dense float16 on Metal)
        row["mlx"] = fmt.representation if fmt else "unsupported"
        n_params += math.prod(t.shape)
    try:
        cfg = read_config(f)
        check_tensors(f, cfg)
        config = asdict(cfg) | {"settings": settings(cfg, md)}
    except GGUFError as e:
        config = {"error": e.problem}
    tokens = md.get("tokenizer.ggml.tokens")
    report = {
        "file": f.path,
        "file_size": f.file_size,
        "gguf_version": f.version,
        "architecture": md.get("general.architecture"),
        "name": md.get("general.name"),
        "parameters": n_params,
        "tensors": len(f.tensors),
        "tensor_bytes": sum(r["bytes"] for r in by_type.values()),
        "types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "context_length": config.get("context_length"),
        "config": config,
        "tokenizer": {
            "model": md.get("tokenizer.ggml.model"),
            "pre": md.get("tokenizer.ggml.pre"),
            "tokens": len(tokens) if tokens is not None else None,
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        },
        "chat_template": "tokenizer.chat_template" in md,
    }
    if all_metadata:
        report["metadata"] = {k: _summary(v) for k, v in md.items() if k not in SHOWN_KEYS}
    return report


def format_text(r: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    tok = r["tokenizer"]
    lines = [
        f"file:           {r['file']} ({mib(r['file_size'])}, GGUF v{r['gguf_version']})",
        f"architecture:   {r['architecture']}" + (f"  ({r['name']})" if r["name"] else ""),
        f"parameters:     {r['parameters']:,} in {r['tensors']} tensors ({mib(r['tensor_bytes'])})",
        f"context length: {r['context_length']}",
        f"tokenizer:      {tok['model']}" + (f" (pre: {tok['pre']})" if tok["pre"] else "") + f", {tok['tokens']} tokens",
        f"chat template:  {'yes' if r['chat_template'] else 'no'}",
    ]
    if "error" in r["config"]:
        lines.append(f"config:         cannot run this file: {r['config']['error']}")
    else:
        c = r["config"]
        lines.append(
            f"config:         {c['num_layers']} layers, hidden {c['hidden_size']}, ffn {c['intermediate_size']}, "
            f"heads {c['num_heads']} (kv {c['num_kv_heads']}), vocab {c['vocab_size']}"
        )
        lines += [f"  {k + ':':<17} {v}" for k, v in c["settings"].items()]
    lines.append("weights:")
    lines.append(f"  {'type':<8} {'tensors':>7} {'size':>12}  MLX form")
    for name, row in r["types"].items():
        lines.append(f"  {name:<8} {row['tensors']:>7} {mib(row['bytes']):>12}  {row['mlx']}")
    if "metadata" in r:
        lines.append("metadata:")
        lines += [f"  {k} = {v}" for k, v in r["metadata"].items()]
    return "\n".join(lines)
