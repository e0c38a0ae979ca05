"""An mlx-lm or Hugging Face model directory, read tensor by tensor in GGUF's names and layout.

    config.json            → `ModelConfig` (`hf_config.from_hf`), the quantization of each layer
    model*.safetensors     → arrays, loaded lazily by `mx.load`: dense, or MLX-quantized
                             (`.weight` packed, `.scales`, `.biases`), any mode and width
    tokenizer files        → GGUF tokenizer metadata (`vocab_from_hf`)

`ModelDir.tensor(gguf_name)` gives each tensor the model needs as a GGUF file would hold it
(llama Q/K rows interleaved, Gemma norms + 1), so the GGUF loader's model and the GGUF writer
take it as they take a file's tensors. Every checkpoint entry is accounted for: a missing
tensor, a wrong shape or an entry the model does not use is one `MlxLlamaError` line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..architectures import tensor_shapes
from ..cpu_mode import choose_cpu_dequantize
from ..errors import MlxLlamaError
from .hf_config import ConfigError, from_hf, text_config
from .names import IGNORED, gguf_name, heads_of, hf_name, is_permuted, norm_offset, rows_to_gguf
from .vocab_from_hf import gguf_vocab

CONFIG = "config.json"
# Prefixes of the language model's parameters in multimodal checkpoints (vision tower dropped)
PREFIXES = ("language_model.", "model.language_model.")
SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class DirError(MlxLlamaError):
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class Quantized:
    """An MLX-quantized weight: w = dequantize(weight, scales, biases) per group of `group_size`."""

    weight: mx.array  # (rows, cols · bits / 32) uint32
    scales: mx.array  # (rows, cols / group_size)
    biases: mx.array | None  # affine mode only
    group_size: int
    bits: int
    mode: str = "affine"

    def dequantize(self, dtype=mx.float32) -> mx.array:
        scales = self.scales if self.mode != "affine" else self.scales.astype(mx.float32)
        biases = None if self.biases is None else self.biases.astype(mx.float32)
        return mx.dequantize(self.weight, scales, biases, group_size=self.group_size, bits=self.bits,
                             mode=self.mode).astype(dtype)

    def rows(self, index: mx.array) -> Quantized:
        return Quantized(self.weight[index], self.scales[index], None if self.biases is None else self.biases[index],
                         self.group_size, self.bits, self.mode)


Source = mx.array | Quantized


def is_model_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


class ModelDir:
    """One directory: `.cfg`, `.config` (config.json, its text part), `.factors` (RoPE factor
    tensors it implies), `.names` (the GGUF tensors `.tensor` gives)."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = text_config(_read_config(self.path))
        self.arrays = self._load_arrays()
        self._quant = self._quantization_entries()
        try:
            self.cfg, self.factors, self.original_context = from_hf(self.config, set(self.arrays), self.path / CONFIG)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(self.path / CONFIG, f"unreadable setting ({type(e).__name__}: {e})") from None
        self.shapes = tensor_shapes(self.cfg)
        self._by_gguf = self._map_names()

    def _load_arrays(self) -> dict[str, mx.array]:
        files = sorted(self.path.glob("model*.safetensors")) or sorted(self.path.glob("*.safetensors"))
        if not files:
            raise DirError(self.path, "no *.safetensors weights")
        arrays = {}
        for file in files:
            try:
                loaded = mx.load(str(file))  # lazy: read when used
            except (RuntimeError, ValueError, OSError) as e:
                raise DirError(file, f"not a readable safetensors file ({e})") from None
            for name, a in loaded.items():
                name = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
                if not name.startswith(SKIPPED):
                    arrays[name] = a
        return arrays

    def _quantization_entries(self) -> dict:
        q = self.config.get("quantization") or self.config.get("quantization_config") or {}
        if not isinstance(q, dict):
            raise DirError(self.path / CONFIG, f"'quantization' is a {type(q).__name__}, not an object")
        return q

    def _map_names(self) -> dict[str, str]:
        """GGUF tensor name → checkpoint module path (or parameter name, for biases and norms);
        entries the model does not use are an error."""
        arch, by_gguf = self.cfg.architecture, {}
        for name in self.arrays:
            if IGNORED.match(name) or (self.cfg.tied_embeddings and name.startswith("lm_head.")):
                continue  # buffers; an output tied to the embeddings is the embeddings
            param = name.rsplit(".", 1)
            if param[-1] in ("scales", "biases") and param[0] + ".weight" in self.arrays:
                continue  # read with their weight
            g = gguf_name(arch, name)
            if g is None or g not in self.shapes:
                raise DirError(self.path, f"tensor {name!r} is not used by architecture {arch!r}")
            by_gguf[g] = name
        for g in self.shapes:
            if g not in by_gguf and not g.startswith("rope_"):
                raise DirError(self.path, f"missing tensor for {g!r} (mlx-lm name {hf_name(arch, g)!r})")
        return by_gguf

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str) -> Source:
        """Tensor `name` (GGUF's), in GGUF's layout; quantized ones stay quantized."""
        if name.startswith("rope_"):
            return mx.array(self.factors[name])
        source = self._read(name)
        if is_permuted(self.cfg.architecture, name):
            index = mx.array(rows_to_gguf(heads_of(self.cfg, name), self.shapes[name][0]))
            source = source.rows(index) if isinstance(source, Quantized) else source[index]
        offset = norm_offset(self.cfg.architecture, name)
        return source + offset if offset else source

    def _read(self, name: str) -> Source:
        key, shape = self._by_gguf[name], self.shapes[name]
        if not key.endswith(".weight") or key[: -len(".weight")] + ".scales" not in self.arrays:
            a = self.arrays[key]
            if tuple(a.shape) != shape:
                raise DirError(self.path, f"tensor {key!r} has shape {tuple(a.shape)}, expected {shape} from config.json")
            return a
        module = key[: -len(".weight")]
        w, scales = self.arrays[key], self.arrays[module + ".scales"]
        group, bits, mode = self._layer_quantization(module, w, scales, shape)
        if w.shape[0] != shape[0] or scales.shape != (shape[0], shape[1] // group):
            raise DirError(self.path, f"quantized tensor {key!r} ({tuple(w.shape)}, scales {tuple(scales.shape)}) does "
                                      f"not hold shape {shape} in {bits}-bit groups of {group}")
        return Quantized(w, scales, self.arrays.get(module + ".biases"), group, bits, mode)

    def _layer_quantization(self, module: str, w: mx.array, scales: mx.array, shape) -> tuple[int, int, str]:
        """(group size, bits, mode) of one layer: its own config entry, else read off the shapes."""
        entry = self._quant.get(module)
        mode = (entry or {}).get("mode") or self._quant.get("mode") or "affine"
        cols = shape[1]
        if isinstance(entry, dict) and "bits" in entry:
            return entry.get("group_size", cols // scales.shape[-1]), entry["bits"], mode
        group, bits = cols // max(1, scales.shape[-1]), w.shape[-1] * 32 // cols
        if scales.dtype == mx.uint8 and mode == "affine":  # the microscaling modes' scales are bytes
            mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group), mode)
        return group, bits, mode

    def vocab(self) -> dict:
        """The tokenizer, as GGUF metadata (`tokenizer.*`)."""
        return gguf_vocab(self.path, self.cfg.vocab_size, self.config)

    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def _read_config(path: Path) -> dict:
    if not (path / CONFIG).is_file():
        raise DirError(path, "not a GGUF file or a model directory (no config.json)")
    try:
        with open(path / CONFIG, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise DirError(path / CONFIG, f"cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise DirError(path / CONFIG, "no 'model_type': not a Hugging Face / mlx-lm model directory "
                                      "(a directory from an older mlx_llama converter? convert the GGUF file again)")
    return config


def load_model_dir(path, *, dtype: mx.Dtype | None = None, cpu_dequantize: bool | None = None) -> tuple:
    """(Model, tokenizer metadata) of a model directory, with the GGUF loader's rules: dense
    weights in `dtype` (float32 on the CPU, float16 on a GPU by default), MLX-affine layers kept
    quantized unless `cpu_dequantize` (None: the CPU-mode rule); other quantization modes are
    dequantized (mlx_llama's layers are affine)."""
    from ..model import build_model, module_path

    d = ModelDir(path)
    on_cpu = mx.default_device() == mx.cpu
    dtype = dtype or (mx.float32 if on_cpu else mx.float16)
    if cpu_dequantize is None:
        cpu_dequantize = choose_cpu_dequantize(d.n_params())
    weights, quantized = [], {}
    for name in d.names:
        source = d.tensor(name)
        key = module_path(name)
        if isinstance(source, Quantized) and source.mode == "affine" and not cpu_dequantize:
            path = key[: -len(".weight")]
            quantized[path] = {"group_size": source.group_size, "bits": source.bits}
            weights += [(key, source.weight), (path + ".scales", source.scales), (path + ".biases", source.biases)]
        else:
            value = source.dequantize() if isinstance(source, Quantized) else source
            weights.append((key, value.astype(mx.float32 if name.startswith("rope_") else dtype)))
        mx.eval([w for _, w in weights[-3:]])  # tensor by tensor: bounded peak memory
    model = build_model(d.cfg, weights, dtype=dtype, quantized=quantized, cpu_dequantized=bool(cpu_dequantize))
    return model, d.vocab()


def as_numpy(a: mx.array) -> np.ndarray:
    """An MLX array as numpy (bfloat16 as float32: numpy has no bfloat16)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
