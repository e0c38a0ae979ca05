"""A GGUF header taken apart for the fuzz test (`fuzz_mutations`): where each count, length, type,
dim and offset sits, each key/value entry and tensor info as bytes, and putting a file back
together from changed entries. A walk of its own, so the fuzz test does not trust the reader it
tests. Little-endian GGUF v2/v3, as `mlx_llama.gguf_file` documents it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
INTS = (U8, I8, U16, I16, U32, I32, U64, I64)
T_F32, T_Q4_1, T_Q8_0 = 0, 3, 8


@dataclass
class KV:
    key: str
    start: int  # the entry's bytes: key length … end of the value
    end: int
    name: tuple[int, int]  # the key's text
    vtype: int
    value: object
    item_type: int | None = None


@dataclass
class Tensor:
    name: str
    start: int  # the tensor info's bytes
    end: int
    name_span: tuple[int, int]
    dims_at: list[int]
    type_at: int
    offset_at: int
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class Layout:
    """Where everything in a GGUF header sits."""

    data: bytes
    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    fields: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # kind → (position, size)
    header_end: int = 0
    data_start: int = 0

    def add(self, kind: str, pos: int, size: int) -> None:
        self.fields.setdefault(kind, []).append((pos, size))


def parse(data: bytes) -> Layout:
    L = Layout(data)
    L.add("magic", 0, 4)
    L.add("version", 4, 4)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    L.add("count", 8, 8)
    L.add("count", 16, 8)
    pos = 24
    for _ in range(n_kv):
        start = pos
        key, pos = _string(L, data, pos, "key length")
        vtype = struct.unpack_from("<I", data, pos)[0]
        L.add("value type", pos, 4)
        value, item, pos = _value(L, data, pos + 4, vtype)
        L.kvs.append(KV(key, start, pos, (start + 8, start + 8 + len(key.encode())), vtype, value, item))
    for _ in range(n_tensors):
        start = pos
        name, pos = _string(L, data, pos, "tensor name length")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        L.add("n_dims", pos, 4)
        dims_at = [pos + 4 + 8 * i for i in range(n_dims)]
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
        pos += 4 + 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", data, pos)
        L.tensors.append(Tensor(name, start, pos + 12, (start + 8, start + 8 + len(name.encode())), dims_at, pos,
                                pos + 4, dims, ggml_type, offset))
        for at in dims_at:
            L.add("dim", at, 8)
        L.add("ggml type", pos, 4)
        L.add("offset", pos + 4, 8)
        pos += 12
    L.header_end = pos
    L.data_start = -(-pos // 32) * 32
    return L


def _string(L: Layout, data: bytes, pos: int, kind: str) -> tuple[str, int]:
    n = struct.unpack_from("<Q", data, pos)[0]
    L.add(kind, pos, 8)
    return data[pos + 8 : pos + 8 + n].decode(), pos + 8 + n


def _value(L: Layout, data: bytes, pos: int, vtype: int):
    if vtype == STRING:
        text, pos = _string(L, data, pos, "string length")
        return text, None, pos
    if vtype != ARRAY:
        return struct.unpack_from(FIXED[vtype], data, pos)[0], None, pos + struct.calcsize(FIXED[vtype])
    item, n = struct.unpack_from("<IQ", data, pos)
    L.add("array item type", pos, 4)
    L.add("array count", pos + 4, 8)
    pos += 12
    if item == STRING:
        items = []
        for _ in range(n):
            text, pos = _string(L, data, pos, "string length")
            items.append(text)
        return items, item, pos
    size = struct.calcsize(FIXED[item])
    return list(struct.unpack_from(f"<{n}{FIXED[item][1]}", data, pos)), item, pos + n * size


# -- writing -----------------------------------------------------------------------------------


def encode(key: str, vtype: int, value, item_type: int | None = None) -> bytes:
    """One key/value entry."""
    return _str(key) + struct.pack("<I", vtype) + _payload(vtype, value, item_type)


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _payload(vtype: int, value, item_type=None) -> bytes:
    """item_type: of an array's items; (ARRAY, inner type) for an array of arrays."""
    if vtype == STRING:
        return _str(value)
    if vtype == ARRAY:
        item, inner = item_type if isinstance(item_type, tuple) else (item_type, None)
        items = b"".join(_payload(item, v, inner) for v in value)
        return struct.pack("<IQ", item, len(value)) + items
    return struct.pack(FIXED[vtype], value)


def assemble(L: Layout, kvs: list[bytes], infos: list[bytes]) -> bytes:
    """A file with these key/value entries and tensor infos, then the base file's tensor data
    at the same offsets from the (re-padded) data start."""
    head = L.data[:8] + struct.pack("<QQ", len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + L.data[L.data_start :]


def entries(L: Layout) -> tuple[list[bytes], list[bytes]]:
    return [L.data[k.start : k.end] for k in L.kvs], [L.data[t.start : t.end] for t in L.tensors]


def patch(data: bytes, pos: int, raw: bytes) -> bytes:
    return data[:pos] + raw + data[pos + len(raw) :]


def kv(L: Layout, key: str) -> KV:
    return next(k for k in L.kvs if k.key == key)


def tensor_bytes(t: Tensor) -> int:
    block, size = {T_F32: (1, 4), T_Q4_1: (32, 20), T_Q8_0: (32, 34)}[t.ggml_type]
    return int(np.prod(t.dims)) // block * size
