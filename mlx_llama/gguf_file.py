"""GGUF file → header → metadata dict, tensor table and model config.

The header is parsed here, from a read-only memory map, on a budget: every count, length,
dimension and offset in it is checked against the bytes the file really has before anything is
allocated or iterated, so a damaged or hostile file costs time and memory in proportion to its
size and fails as one `GGUFError` naming the file and the problem (the CLI prints it as a single
line). The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    "GGUF" | version u32 | tensor count u64 | key/value count u64
    key/value count × (key: string | value type u32 | value)
    tensor count × (name: string | n_dims u32 | dims u64 × n_dims | ggml type u32 | offset u64)
    padding to `general.alignment` (default 32) | tensor data, at the offsets (aligned too)

A string is its byte length (u64) and that many UTF-8 bytes; an array is its item type (u32),
its item count (u64) and the items. Dims are GGUF order, columns first.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 had 32-bit counts and lengths
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays: no real file nests; the limit keeps recursion bounded

# GGUF value types (gguf.GGUFValueType): the fixed-size ones as id → struct format of one item.
FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
BOOL, STRING, ARRAY = 7, 8, 9
INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)

# The fewest bytes each part can take: what a count must be able to pay for before any loop.
MIN_ITEM = {**{t: struct.calcsize(f) for t, f in FIXED.items()}, STRING: 8, ARRAY: 12}
MIN_KEY_VALUE = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, ggml type, offset

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALAR = {t: struct.Struct(f) for t, f in FIXED.items()}




@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: (rows, ..., columns); GGUF stores it reversed
    data: np.ndarray  # the tensor's bytes, memory-mapped read-only: (*shape[:-1], bytes per row) uint8


@functools.cache
def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id → (name, weights per block, bytes per block), from gguf's public tables."""
    import gguf

    return {int(t): (t.name, block, size) for t, (block, size) in gguf.GGML_QUANT_SIZES.items()}


# -- bytes → header: a cursor that checks every length against what is left ------------------


class _Cursor:
    def __init__(self, path: str, buf: mmap.mmap):
        self.path, self.buf, self.size, self.pos = path, buf, len(buf), 0

    def error(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    def check(self, nbytes: int, what: str) -> None:
        """That `nbytes` more bytes are there, for `what`."""
        if nbytes > self.size - self.pos:
            raise self.error(f"truncated or corrupt header: {nbytes} bytes for {what} at offset {self.pos}, "
                             f"but only {self.size - self.pos} are left")

    def take(self, nbytes: int, what: str) -> int:
        """Claim the next `nbytes` bytes; their offset."""
        self.check(nbytes, what)
        self.pos += nbytes
        return self.pos - nbytes

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        start = self.take(self.u64(what), what)
        try:
            return self.buf[start : self.pos].decode()
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not valid UTF-8 (byte {start + e.start})") from None


def _read_counts(cur: _Cursor) -> tuple[int, int, int]:
    """The version, tensor count and key/value count, each count paid for by the bytes left."""
    cur.take(4, "the magic")
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        endian = " (a big-endian file?)" if version and not version & 0xFFFF else ""
        raise cur.error(f"unsupported GGUF version {version}{endian}; supported: 2, 3")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key/value count")
    for count, what, least in ((n_kv, "key/value pairs", MIN_KEY_VALUE), (n_tensors, "tensors", MIN_TENSOR_INFO)):
        if count * least > cur.size - cur.pos:
            raise cur.error(f"truncated or corrupt header: {count} {what} need at least {count * least} bytes, "
                            f"but only {cur.size - cur.pos} are left after the counts")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
    """key → value (str, int, float, bool or a list of them) and key → (value type, item type)."""
    metadata, types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        if key in metadata:
            raise cur.error(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"the type of {key!r}")
        start = cur.pos  # an array's value starts with its item type
        metadata[key] = _read_value(cur, vtype, key)
        types[key] = (vtype, _U32.unpack_from(cur.buf, start)[0] if vtype == ARRAY else None)
    return metadata, types


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == STRING:
        return cur.string(f"the value of {key!r}")
    if vtype == ARRAY:
        return _read_array(cur, key)
    if vtype not in FIXED:
        raise cur.error(f"metadata key {key!r} has unknown value type {vtype}")
    return _SCALAR[vtype].unpack_from(cur.buf, cur.take(MIN_ITEM[vtype], f"the value of {key!r}"))[0]


def _read_array(cur: _Cursor, key: str, nested: str = "", depth: int = 0) -> list:
    """`nested`: how errors name an array inside `key`'s, formatted once, as a key can be long."""
    item_type = cur.u32(nested or f"the item type of {key!r}")
    n = cur.u64(nested or f"the length of {key!r}")
    if item_type not in MIN_ITEM:
        raise cur.error(f"metadata key {key!r} holds an array of unknown value type {item_type}")
    what = nested or f"the {n} items of {key!r}"
    cur.check(n * MIN_ITEM[item_type], what)  # before any loop or allocation sized by n
    if item_type == STRING:
        return _read_strings(cur, n, key)
    if item_type == ARRAY:
        if depth + 1 >= MAX_ARRAY_DEPTH:
            raise cur.error(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        nested = nested or f"an array nested in {key!r}"
        return [_read_array(cur, key, nested, depth + 1) for _ in range(n)]
    # A numeric array is one view of the mapped bytes, turned into Python values at once.
    items = np.frombuffer(cur.buf, FIXED[item_type].replace("?", "B"), n, cur.take(n * MIN_ITEM[item_type], what))
    return (items != 0).tolist() if item_type == BOOL else items.tolist()


def _read_strings(cur: _Cursor, n: int, key: str) -> list[str]:
    """A string array. Each length sits before its string, so this walks them in a loop (the
    caller checked that n lengths fit), in locals only: vocabularies hold 100k-300k strings."""
    buf, size, pos, unpack = cur.buf, cur.size, cur.pos, _U64.unpack_from
    out: list[str] = []
    append = out.append
    try:
        for i in range(n):
            end = pos + 8 + unpack(buf, pos)[0]  # struct.error when not even the length is there
            if end > size:
                break
            append(buf[pos + 8 : end].decode())
            pos = end
    except struct.error:
        pass
    except UnicodeDecodeError as e:
        raise cur.error(f"item {i} of {key!r} is not valid UTF-8 (byte {pos + 8 + e.start})") from None
    cur.pos = pos
    if len(out) < n:
        cur.string(f"item {len(out)} of {key!r}")  # reads the item that does not fit again, to say why
    return out


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
    """(name, dims in GGUF order, ggml type, offset) of each tensor, as the file says."""
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}")
        what = f"tensor {name!r}"
        n_dims = cur.u32(f"{what}'s dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS} are possible)")
        dims = list(struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.take(8 * n_dims, f"{what}'s dimensions")))
        ggml_type = cur.u32(f"{what}'s type")
        infos.append((name, dims, ggml_type, cur.u64(f"{what}'s offset")))
    return infos


def _alignment(cur: _Cursor, metadata: dict, types: dict) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if types["general.alignment"][0] not in INTEGERS or alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"general.alignment must be a power of two, not {alignment!r}")
    return alignment


def _place_tensors(cur: _Cursor, infos: list, alignment: int) -> dict[str, TensorInfo]:
    """Each tensor's bytes, checked against its type and shape, the file's end and each other."""
    data_start = -(-cur.pos // alignment) * alignment
    file_bytes = np.ndarray((cur.size,), np.uint8, buffer=cur.buf)  # its base is the mmap (quants._FilePages)
    tensors: dict[str, TensorInfo] = {}
    spans = []  # (start, end, name) in the file
    for name, dims, ggml_type, offset in infos:
        what = f"tensor {name!r}"
        if name in tensors:
            raise cur.error(f"duplicate tensor name {name!r}")
        if ggml_type not in _ggml_types():
            raise cur.error(f"{what} has unknown ggml type {ggml_type}")
        type_name, block, type_size = _ggml_types()[ggml_type]
        shape = tuple(reversed(dims))
        if 0 in dims:
            raise cur.error(f"{what} has a zero dimension (shape {shape})")
        if dims[0] % block:
            raise cur.error(f"{what}: row length {dims[0]} is not a multiple of {type_name}'s block size {block}")
        nbytes = math.prod(dims) // block * type_size  # Python ints: no overflow whatever the dims
        if offset % alignment:
            raise cur.error(f"{what} starts at offset {offset}, not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + nbytes > cur.size:
            raise cur.error(f"file is truncated or corrupt: {what} ({type_name}, shape {shape}) ends at byte "
                            f"{start + nbytes} but the file has {cur.size} bytes")
        rows = file_bytes[start : start + nbytes].reshape(*shape[:-1], dims[0] // block * type_size)
        tensors[name] = TensorInfo(name, ggml_type, shape, rows)
        spans.append((start, start + nbytes, name))
    _check_layout(cur, spans, data_start, alignment)
    return tensors


def _check_layout(cur: _Cursor, spans: list[tuple[int, int, str]], data_start: int, alignment: int) -> None:
    """The tensors tile the data section, as every GGUF writer lays them out: in offset order,
    each starts where the one before it ends (padded to the alignment), and the file ends with
    the last one's padding. So a changed type or shape that still fits somewhere — a smaller
    type leaving a gap, a larger one running into its neighbour — cannot load as other weights."""
    spans = sorted(spans)
    expected, before = data_start, None
    for start, end, name in spans:
        if start < expected and before is not None:
            raise cur.error(f"tensors {before!r} and {name!r} overlap (bytes {start}-{min(end, expected)})")
        if start > expected:
            after = f"tensor {before!r} ends" if before is not None else "the data section starts"
            raise cur.error(f"tensor {name!r} starts at byte {start} but {after} at byte {expected}: "
                            f"{start - expected} bytes that no tensor holds (a wrong type, shape or offset?)")
        expected, before = -(-end // alignment) * alignment, name
    if spans and cur.size > expected:
        raise cur.error(f"{cur.size - expected} bytes after the end of the last tensor {before!r} "
                        f"(byte {expected}) that no tensor holds (a wrong type, shape or offset?)")


# -- the file ------------------------------------------------------------------------------------


def _open_regular(path: str):
    """The file at `path` opened for reading, if it is a regular file. Opened without blocking
    and checked on the open descriptor, so a FIFO (which would block the open until a writer
    comes), a device (/dev/zero has no end) or a directory is refused, even if swapped in after
    a check by name."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file"
            raise GGUFError(path, f"not a regular file ({kind})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (key → Python value), `.types` (key → (GGUF value
    type, item type of an array or None)) and `.tensors` (name → TensorInfo)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with _open_regular(self.path) as fh:
                magic = fh.read(4)
                if magic != GGUF_MAGIC:
                    raise GGUFError(self.path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(self.path, getattr(e, "strerror", None) or str(e)) from None
        cur = _Cursor(self.path, buf)
        self.file_size = cur.size
        self.version, n_tensors, n_kv = _read_counts(cur)
        self.metadata, self.types = _read_metadata(cur, n_kv)
        self.metadata_end = cur.pos  # where the key/value pairs end and the tensor table starts
        infos = _read_tensor_infos(cur, n_tensors)
        self.alignment = _alignment(cur, self.metadata, self.types)
        self.tensors = _place_tensors(cur, infos, self.alignment)

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
            # a float key holds FLOAT32/FLOAT64, as llama.cpp insists: an integer there is damage
            # (a float's bits read as UINT32 would otherwise be a finite, wrong value)
            float: lambda v: isinstance(v, (float, np.floating)),
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
