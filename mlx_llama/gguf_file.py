"""GGUF file → metadata dict, model config and raw tensor blocks.

Everything that can be wrong with a file is reported as one `GGUFError` whose message names
the file and the problem; the CLI prints it as a single line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"


@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: (rows, ..., columns); GGUF stores it reversed
    data: np.ndarray  # raw bytes (uint8) or typed elements, memory-mapped


class _TruncatedTensor(Exception):
    pass


def open_reader(path: str):
    """gguf's reader, made to say which tensor runs past the end of a cut file.

    Its own failure there is an opaque numpy reshape error, raised while it builds the tensor
    views; the tensor-info fields it passes to `_build_tensors` hold everything needed to say
    more (name, dims, type, offset), so the check goes just before that step.
    """
    import gguf

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            # Slicing a plain ndarray view of the mapping instead of the np.memmap subclass:
            # the same bytes, ~3x faster on files with big tokenizer arrays.
            if type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            arr = self.data[offset : offset + dt.itemsize * int(count)].view(dt)[: int(count)]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _build_tensors(self, start_offs, fields):
            for f in fields:
                _, name, _, dims, raw_type, offset = f.parts
                try:
                    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                except ValueError:
                    continue  # unknown type: reported by the reader itself
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise _TruncatedTensor(
                        f"file is truncated: tensor {bytes(name).decode(errors='replace')!r} "
                        f"ends at byte {end} but the file has {len(self.data)} bytes"
                    )
            super()._build_tensors(start_offs, fields)

    return Reader(path, "r")


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (key → Python value) and `.tensors` (name → TensorInfo)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise GGUFError(self.path, e.strerror or str(e)) from None
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            reader = open_reader(self.path)
        except _TruncatedTensor as e:
            raise GGUFError(self.path, str(e)) from None
        except Exception as e:  # the reader raises ValueError/IndexError/... on short or corrupt headers
            raise GGUFError(self.path, f"corrupt or truncated header ({type(e).__name__}: {e})") from None
        self.reader = reader
        self.metadata: dict[str, Any] = {}
        for key, f in reader.fields.items():
            try:
                self.metadata[key] = f.contents()
            except Exception as e:
                raise GGUFError(self.path, f"unreadable metadata value for {key!r} ({e})") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), shape, t.data)
        self.file_size = size
        last = list(reader.fields.values())[-1]  # the header's key/value pairs end where the tensor table starts
        self.metadata_end = int(last.offset) + sum(int(p.nbytes) for p in last.parts)

    # -- typed metadata access ------------------------------------------------------------------

    def get(self, key: str, kind: type, default: Any = ...):
        """The value at `key`, checked to be of `kind` (int, float, str, bool, list)."""
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(self.path, f"missing metadata key {key!r}")
            return default
        value = self.metadata[key]
        ok = {
            int: lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            bool: lambda v: isinstance(v, (bool, np.bool_)),
            list: lambda v: isinstance(v, (list, np.ndarray)),
        }[kind](value)
        if not ok:
            raise GGUFError(
                self.path, f"metadata key {key!r} has type {type(value).__name__}, expected {kind.__name__}"
            )
        return kind(value) if kind is not list else value

    @property
    def architecture(self) -> str:
        return self.get("general.architecture", str)
