"""mlx-lm or Hugging Face model directory → GGUF file that llama.cpp (and mlx_llama) runs.

Each tensor's GGUF type follows from its form in the directory:

    MLX affine 2/3/4-bit, group 32·k    Q4_1, the same q and scales: lossless (float16 scales)
    MLX affine 5-bit, group 32·k        Q5_1, lossless the same way
    MLX affine 6/8-bit, other modes     Q8_0 from the dequantized values (the nearest: error reported)
    float, 2-D                          the type asked for: F32, F16, BF16, Q8_0, Q4_0, Q4_1
                                        (F16 where a row is not a whole number of 32-weight blocks)
    float, 1-D (norms, biases)          F32

The numbers llama.cpp will compute with are decoded back from the written bytes and compared
with the directory's: the largest and the RMS error per conversion are reported, so "lossless"
is measured, not assumed. The metadata: the `{arch}.*` keys (`hf_config.gguf_keys`), the
tokenizer (`vocab_from_hf`), general.name/file_type. llama `attn_q`/`attn_k` rows are permuted
and Gemma norms offset as llama.cpp's converter does (`ModelDir.tensor`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from tqdm import tqdm

from ..errors import MlxLlamaError
from .atomic import atomic_output
from .encoders import EXACT_TARGET, affine_blocks, decode, encode_float, unpack
from .hf_config import gguf_keys
from .mlx_dir import ModelDir, Quantized, Source, as_numpy

OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1}
ROWS_PER_CHUNK_WEIGHTS = 1 << 22  # encode ~4M weights at a time: bounded numpy temporaries


@dataclass
class ConversionReport:
    """One (directory form → GGUF type) pair: how many tensors, and the error measured."""

    source: str  # e.g. "affine 4-bit, group 32", "float16"
    target: str  # GGUF type name
    tensors: int = 0
    weights: int = 0
    max_error: float = 0.0  # largest |Δ| of any weight
    squared_error: float = 0.0  # Σ Δ²
    squared_value: float = 0.0  # Σ w²

    @property
    def relative_rms(self) -> float:
        return (self.squared_error / self.squared_value) ** 0.5 if self.squared_value else 0.0


def to_gguf(src_dir, out_path, *, outtype: str = "f16", force: bool = False,
            progress: bool | None = None) -> list[ConversionReport]:
    """Write the model directory `src_dir` as the GGUF file `out_path` (see the module docstring);
    `outtype`: the GGUF type of float matrices. Errors are `MlxLlamaError`s, raised before the
    output is created."""
    if outtype not in OUTTYPES:
        raise MlxLlamaError(f"unknown output type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    d = ModelDir(src_dir)
    metadata = {**gguf_keys(d.cfg, d.original_context, d.path / "config.json"), **d.vocab()}
    plan = {name: _target(d.tensor(name), d.shapes[name], OUTTYPES[outtype]) for name in d.names}
    reports: dict[tuple[str, str], ConversionReport] = {}
    total = sum(np.prod(s) for s in d.shapes.values())
    bar = tqdm(total=int(total), unit="w", unit_scale=True, desc="converting", file=sys.stderr, leave=False,
               disable=not (sys.stderr.isatty() if progress is None else progress), dynamic_ncols=True)
    with atomic_output(out_path, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), d.cfg.architecture)
        _add_metadata(writer, metadata, d, plan)
        for name, target in plan.items():
            # the logical (numpy-order) shape with its GGML type; the bytes follow one by one
            writer.add_tensor_info(name, d.shapes[name], np.dtype(np.float32), _nbytes(d.shapes[name], target), raw_dtype=target)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, target in plan.items():
            source = d.tensor(name)
            data, report = _encode(source, target, d.shapes[name])
            _merge(reports, _form(source), target.name, report)
            writer.write_tensor_data(data)
            bar.update(int(np.prod(d.shapes[name])))
        writer.close()
        bar.close()
    return list(reports.values())


def _target(source: Source, shape: tuple, outtype: T) -> T:
    if len(shape) == 1:
        return T.F32
    if isinstance(source, Quantized):
        if source.mode == "affine" and source.bits in EXACT_TARGET and source.group_size % 32 == 0:
            return EXACT_TARGET[source.bits]
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    if outtype in (T.Q8_0, T.Q4_0, T.Q4_1) and shape[-1] % 32:
        return T.F16  # as llama.cpp's converter: rows that are no whole number of blocks stay float
    return outtype


def _nbytes(shape: tuple, target: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[target]
    return int(np.prod(shape)) // block * size


def _form(source: Source) -> str:
    if isinstance(source, Quantized):
        mode = "affine" if source.mode == "affine" else source.mode
        return f"{mode} {source.bits}-bit, group {source.group_size}"
    return str(source.dtype).replace("mlx.core.", "")


def _encode(source: Source, target: T, shape: tuple) -> tuple[np.ndarray, ConversionReport]:
    """The tensor's bytes in `target`, row chunk by row chunk, and the error of each weight
    as llama.cpp will decode it against the directory's value."""
    rows = shape[0] if len(shape) > 1 else 1
    step = max(1, ROWS_PER_CHUNK_WEIGHTS // shape[-1])
    report, parts = ConversionReport("", target.name, tensors=1), []
    for r in range(0, rows, step):
        chunk = _rows(source, r, r + step, len(shape))
        values = as_numpy(chunk.dequantize() if isinstance(chunk, Quantized) else chunk.astype(mx.float32))
        if isinstance(chunk, Quantized) and target in (T.Q4_1, T.Q5_1):
            data = affine_blocks(unpack(np.array(chunk.weight), chunk.bits), as_numpy(chunk.scales),
                                 as_numpy(chunk.biases), chunk.group_size, target)
        else:
            data = encode_float(values, target)
        delta = decode(data, target).reshape(values.shape) - values
        report.weights += values.size
        report.max_error = max(report.max_error, float(np.abs(delta).max(initial=0.0)))
        report.squared_error += float(np.square(delta, dtype=np.float64).sum())
        report.squared_value += float(np.square(values, dtype=np.float64).sum())
        parts.append(data)
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return (data.reshape(-1) if len(shape) == 1 else data), report


def _rows(source: Source, start: int, stop: int, ndim: int) -> Source:
    if ndim == 1:
        return source.reshape(1, -1)
    if isinstance(source, Quantized):
        return Quantized(source.weight[start:stop], source.scales[start:stop],
                         None if source.biases is None else source.biases[start:stop],
                         source.group_size, source.bits, source.mode)
    return source[start:stop]


def _merge(reports: dict, source: str, target: str, r: ConversionReport) -> None:
    total = reports.setdefault((source, target), ConversionReport(source, target))
    total.tensors += r.tensors
    total.weights += r.weights
    total.max_error = max(total.max_error, r.max_error)
    total.squared_error += r.squared_error
    total.squared_value += r.squared_value


# -- metadata ------------------------------------------------------------------------------------

_ARRAY_TYPES = {"tokenizer.ggml.token_type": V.INT32, "tokenizer.ggml.scores": V.FLOAT32}


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict, d: ModelDir, plan: dict) -> None:
    name = d.config.get("_name_or_path") or d.path.resolve().name
    writer.add_name(str(name).rstrip("/").rsplit("/", 1)[-1])
    matrices = [t for n, t in plan.items() if len(d.shapes[n]) > 1]
    main = max(set(matrices), key=matrices.count)
    writer.add_file_type(FILE_TYPES.get(main, gguf.LlamaFileType.GUESSED))
    if main not in (T.F32, T.F16, T.BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        writer.add_key_value(key, value, *_value_type(key, value))


def _value_type(key: str, value) -> tuple[V, V | None]:
    """The GGUF type of one metadata value: ints u32 (ids, sizes), floats f32, as llama.cpp writes them."""
    if isinstance(value, list):
        if key in _ARRAY_TYPES:
            return V.ARRAY, _ARRAY_TYPES[key]
        item = value[0] if value else ""
        return V.ARRAY, V.BOOL if isinstance(item, bool) else V.STRING if isinstance(item, str) else V.INT32
    if isinstance(value, bool):
        return V.BOOL, None
    if isinstance(value, int):
        return V.UINT32, None
    if isinstance(value, float):
        return V.FLOAT32, None
    return V.STRING, None
