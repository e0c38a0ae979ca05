"""GGUF file → mlx-lm model directory: what `mlx_lm.load` / `mlx_lm.generate` / `mlx_lm.server`
(and `mlx_llama.load`) open.

    config.json                  Hugging Face settings (`hf_config`), per-layer `quantization`
    model.safetensors            MLX arrays under mlx-lm's parameter names, quantized layers in MLX's
                                 affine form (weight, scales, biases); sharded above 5 GB
                                 (model-0000i-of-0000N.safetensors + model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json    the vocabulary, special tokens, chat template

Each tensor takes its `quants.FORMATS` form: legacy types (Q4_0 … Q8_0), Q3_K and IQ4_NL stay
quantized with every value kept; Q4_K, Q5_K and IQ4_XS stay quantized with their scales in the
chosen dtype (exact in float32); Q2_K and Q6_K have no MLX quantized form and are dequantized
(refused with `strict`). Every tensor's largest change is measured against gguf's values and
reported per type.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..architectures import check_tensors, read_config
from ..errors import GGUFError
from ..gguf_file import GGUFFile, TensorInfo
from ..quants import FORMATS, SUBBLOCK16, decode_tensor, type_name
from ..tokenizer import Tokenizer
from .atomic import atomic_output
from .hf_config import to_hf, zero_biases
from .names import heads_of, hf_name, is_permuted, norm_offset, rows_to_hf
from .vocab_to_hf import write_tokenizer_files

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's and transformers' shard size


@dataclass
class TypeReport:
    """What became of one GGUF type's tensors."""

    ggml_type: str
    form: str  # the MLX form, e.g. "affine 4-bit, group 32" or "float16"
    dequantized: bool  # a quantized type stored dense (no MLX quantized form)
    tensors: int = 0
    file_bytes: int = 0  # in the GGUF file
    bytes: int = 0  # in the directory
    max_error: float = 0.0  # largest |Δ| against gguf's value of any weight


def gguf_to_mlx(gguf_path, out_dir, *, dtype: str = "float16", strict: bool = False, force: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool | None = None) -> list[TypeReport]:
    """Convert the GGUF file at `gguf_path` into the mlx-lm directory `out_dir` (see the module
    docstring); `dtype`: of dense weights, norms and quantization scales. Returns a report per
    GGUF type. Errors are `MlxLlamaError`s, raised before anything is written."""
    f = GGUFFile(gguf_path)
    cfg = read_config(f)
    shapes = check_tensors(f, cfg)
    factors = {n: np.asarray(decode_tensor(f.path, t, mx.float32)) for n, t in f.tensors.items() if n.startswith("rope_")}
    config = to_hf(cfg, factors, f.path, f.metadata.get(f"{cfg.architecture}.rope.scaling.original_context_length"))
    tokenizer = Tokenizer.from_gguf(f)  # checks the vocabulary before any output
    weights = [n for n in shapes if not n.startswith("rope_")]
    if strict:
        _refuse_dequantizing(f, weights, dtype)
    reports: dict[int, TypeReport] = {}
    quantized: dict[str, dict] = {}
    bar = tqdm(total=sum(f.tensors[n].data.nbytes for n in weights), unit="B", unit_scale=True, unit_divisor=1024,
               desc="converting", disable=not (sys.stderr.isatty() if progress is None else progress), file=sys.stderr,
               leave=False, dynamic_ncols=True)
    with atomic_output(out_dir, force=force, directory=True) as tmp:
        shards = _Shards(tmp, max_shard_bytes)
        for name in weights:
            t = f.tensors[name]
            arrays, quant, error = _convert(f.path, t, cfg, DTYPES[dtype])
            if quant is not None:
                quantized[hf_name(cfg.architecture, name).rsplit(".", 1)[0]] = quant
            report = reports.setdefault(t.ggml_type, _report(t.ggml_type, quant, dtype))
            report.tensors, report.file_bytes = report.tensors + 1, report.file_bytes + t.data.nbytes
            report.bytes += sum(a.nbytes for a in arrays.values())
            report.max_error = max(report.max_error, error)
            for key, a in arrays.items():
                shards.add(key, a)
            bar.update(t.data.nbytes)
        for layer in zero_biases(cfg):  # biases mlx-lm's module has and the file lacks: zeros, exact
            for i in range(cfg.num_layers):
                rows = f.tensors[f"blk.{i}.{layer}.weight"].shape[0]
                shards.add(hf_name(cfg.architecture, f"blk.{i}.{layer}.bias"), mx.zeros((rows,), DTYPES[dtype]))
        shards.finish()
        bar.close()
        _write_config(tmp, config, quantized, tokenizer, dtype)
        write_tokenizer_files(tokenizer.metadata, tmp, cfg.context_length)
    return list(reports.values())


def _refuse_dequantizing(f: GGUFFile, weights: list[str], dtype: str) -> None:
    for name in weights:
        t = f.tensors[name]
        if t.ggml_type in SUBBLOCK16:
            fmt = FORMATS[t.ggml_type]
            raise GGUFError(f.path, f"tensor {name!r} is {fmt.name}, which has no MLX quantized form (16-weight "
                                    f"sub-blocks): it would be dequantized to {dtype} ({_bits(dtype)} bits per weight "
                                    f"instead of {fmt.file_bits_per_weight:.4g}); refused (--strict)")


def _bits(dtype: str) -> int:
    return 32 if dtype == "float32" else 16


def _report(ggml_type: int, quant: dict | None, dtype: str) -> TypeReport:
    if quant is not None:
        scales = "float32" if dtype == "float32" else dtype
        return TypeReport(type_name(ggml_type), f"affine {quant['bits']}-bit, group {quant['group_size']} ({scales} scales)", False)
    return TypeReport(type_name(ggml_type), dtype, ggml_type in SUBBLOCK16)


def _convert(path: str, t: TensorInfo, cfg, dtype: mx.Dtype) -> tuple[dict[str, mx.array], dict | None, float]:
    """One GGUF tensor as mlx-lm's arrays by parameter name, its quantization (None: dense) and
    the largest |Δ| of any value against gguf's (in Hugging Face's layout: rows, norm offset)."""
    exact = decode_tensor(path, t, mx.float32, expand=True)  # gguf's values, float32
    order = mx.array(rows_to_hf(heads_of(cfg, t.name), t.shape[0])) if is_permuted(cfg.architecture, t.name) else None
    if order is not None:
        exact = exact[order]
    exact = exact - norm_offset(cfg.architecture, t.name)
    name = hf_name(cfg.architecture, t.name)
    dense = FORMATS[t.ggml_type].block_size == 1 or t.ggml_type in SUBBLOCK16  # no MLX quantized form to keep
    if dense:
        arrays, quant = {name: exact.astype(dtype)}, None
        values = arrays[name].astype(mx.float32)
    else:
        a = decode_tensor(path, t, dtype)
        if dtype == mx.float32 and a.exact is not None:  # gguf's float32 scales: no rounding
            scale, bias, zero = a.exact
            scales, biases = scale, bias - zero * scale
        else:
            scales, biases = a.scales.astype(dtype), a.biases.astype(dtype)
        w, s, b = (a.weight, scales, biases) if order is None else (a.weight[order], scales[order], biases[order])
        module = name.rsplit(".", 1)[0]
        arrays = {f"{module}.weight": w, f"{module}.scales": s, f"{module}.biases": b}
        quant = {"group_size": a.group_size, "bits": a.bits, "mode": "affine"}
        values = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=a.group_size, bits=a.bits)
    error = mx.max(mx.abs(values - exact)).item()
    mx.eval(arrays)
    return arrays, quant, error


class _Shards:
    """Arrays saved into model*.safetensors as they come, a file each time `max_bytes` would be passed."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.pending: dict[str, mx.array] = {}
        self.files: list[tuple[Path, list[str]]] = []
        self.size = self.total = 0

    def add(self, name: str, array: mx.array) -> None:
        if self.pending and self.size + array.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = array
        self.size += array.nbytes
        self.total += array.nbytes

    def _flush(self) -> None:
        path = self.directory / f"model-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.files.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        """The last file; names as transformers gives them, with an index when there are several."""
        self._flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(directory: Path, config: dict, quantized: dict[str, dict], tokenizer: Tokenizer, dtype: str) -> None:
    """config.json: the settings, the special token ids mlx-lm stops at, and the quantization —
    the most common (bits, group) as default, the other quantized layers each their own."""
    config = {**config, "torch_dtype": dtype, "bos_token_id": tokenizer.bos_id,
              "eos_token_id": sorted(tokenizer.stop_ids) if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id}
    if quantized:
        counts: dict[tuple, int] = {}
        for q in quantized.values():
            counts[q["bits"], q["group_size"]] = counts.get((q["bits"], q["group_size"]), 0) + 1
        bits, group = max(counts, key=counts.get)
        quantization = {"group_size": group, "bits": bits, "mode": "affine"}
        quantization.update({p: q for p, q in quantized.items() if (q["bits"], q["group_size"]) != (bits, group)})
        config["quantization"] = config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2))
