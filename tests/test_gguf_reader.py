"""mlx_llama's GGUF header reader: every value type round-trips, and hostile files fail fast.

Each hostile file (counts and lengths far beyond the file, truncation at every byte, unknown
types, tensors misplaced) must give one `GGUFError` line naming the file, within 2 s, with
bounded memory and no numpy warnings; gguf's own reader hangs on several of them.
"""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
import warnings

import gguf
import numpy as np
import pytest

from mlx_llama.gguf_file import GGUFError, GGUFFile

V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType


# -- raw GGUF bytes, for files gguf's writer will not write -----------------------------------


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + u32(vtype) + payload


def array(item_type: int, n: int, items: bytes = b"") -> bytes:
    return u32(item_type) + u64(n) + items


def tensor_info(name: str, dims, ggml_type: int = T.F32, offset: int = 0) -> bytes:
    """`dims` in GGUF order (columns first)."""
    return string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def gguf_bytes(kvs=(), infos=(), data: bytes = b"", *, version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    head = (b"GGUF" + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    return head + bytes(-len(head) % align) + data if data else head


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


ARCH = kv("general.architecture", V.STRING, string("llama"))
F32_ROWS = np.arange(32, dtype=np.float32).tobytes()  # two tensors of (2, 8) float32: 64 bytes each


def tiny_file() -> bytes:
    """A small well-formed file: a few keys (string, int, float array, string array), two tensors."""
    kvs = [ARCH, kv("a.count", V.UINT32, u32(7)),
           kv("a.floats", V.ARRAY, array(V.FLOAT32, 2, struct.pack("<2f", 0.5, -1))),
           kv("a.words", V.ARRAY, array(V.STRING, 2, string("hi") + string("ü")))]
    infos = [tensor_info("x", [8, 2], T.F32, 0), tensor_info("y", [8, 2], T.F32, 64)]
    return gguf_bytes(kvs, infos, F32_ROWS)


# -- a well-formed file round-trips -------------------------------------------------------------

SCALARS = [(V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768), (V.UINT32, 2**32 - 1),
           (V.INT32, -(2**31)), (V.FLOAT32, 0.1), (V.BOOL, True), (V.STRING, "héllo 🦙"),
           (V.UINT64, 2**64 - 1), (V.INT64, -(2**63)), (V.FLOAT64, 1e-300)]


def test_every_value_type_round_trips(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for vtype, value in SCALARS:
        w.add_key_value(f"s.{vtype.name}", value, vtype)
        if vtype != V.STRING:
            other = not value if vtype == V.BOOL else type(value)(0)
            w.add_key_value(f"a.{vtype.name}", [value, other], V.ARRAY, sub_type=vtype)
    w.add_key_value("a.bools", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("a.strings", ["a", "", "日本語"], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("a.nested", [["x", "yz"], ["", "w"]], V.ARRAY)
    w.add_custom_alignment(64)
    tensors = {"f32": np.ones((3, 4), np.float32), "f16": np.full((2, 5, 8), 2, np.float16)}
    for name, value in tensors.items():
        w.add_tensor(name, value)
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), T.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=T.Q8_0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    f, ref = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for key, field in fields.items():
        expected = field.contents()
        if key == "a.nested":  # gguf's contents() flattens nested arrays; we keep their structure
            assert f.metadata[key] == [["x", "yz"], ["", "w"]] and expected == ["x", "yz", "", "w"]
            assert f.types[key] == (V.ARRAY, V.ARRAY)
            continue
        assert f.metadata[key] == expected, key
        assert type(f.metadata[key]) is type(expected), key
        if isinstance(expected, list):
            assert [type(v) for v in f.metadata[key]] == [type(v) for v in expected], key
        sub = field.types[1] if field.types[0] == V.ARRAY else None
        assert f.types[key] == (field.types[0], sub), key
    assert f.metadata["s.FLOAT32"] == np.float32(0.1)
    assert (f.version, f.alignment, f.file_size) == (3, 64, path.stat().st_size)
    last = list(ref.fields.values())[-1]
    assert f.metadata_end == last.offset + sum(p.nbytes for p in last.parts)
    assert [(t.name, t.ggml_type, t.shape) for t in f.tensors.values()] == [
        ("f32", T.F32, (3, 4)), ("f16", T.F16, (2, 5, 8)), ("q8", T.Q8_0, (2, 64))]
    for t in ref.tensors:
        data = f.tensors[t.name].data
        assert data.dtype == np.uint8 and data.shape[:-1] == f.tensors[t.name].shape[:-1] and not data.flags.writeable
        assert data.tobytes() == np.asarray(t.data).tobytes()
    assert f.tensors["q8"].data.shape == (2, 68)  # two rows of two Q8_0 blocks
    assert np.array_equal(f.tensors["f16"].data.view(np.float16).reshape(2, 5, 8), tensors["f16"])


@pytest.mark.parametrize("name", ["smollm2", "llama-spm"])
def test_real_files_read_as_gguf_reads_them(name, smollm2_path):
    """SmolLM2 (272 tensors, BPE merges) and a SentencePiece vocabulary (scores): the keys,
    values, value types, tensors and bytes that gguf's own reader finds."""
    from test_tokenizer import vocab_path

    path = smollm2_path if name == "smollm2" else vocab_path(name)
    f, ref = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for key, field in fields.items():
        assert f.metadata[key] == field.contents(), key
        assert f.types[key] == (field.types[0], field.types[1] if field.types[0] == V.ARRAY else None), key
    assert [(t.name, t.ggml_type, t.shape) for t in f.tensors.values()] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in ref.tensors]
    for t in ref.tensors:
        assert np.array_equal(f.tensors[t.name].data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


def test_empty_arrays_and_no_tensors(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(gguf_bytes([ARCH, kv("a", V.ARRAY, array(V.INT32, 0)), kv("b", V.ARRAY, array(V.STRING, 0))]))
    f = GGUFFile(path)
    assert f.metadata == {"general.architecture": "llama", "a": [], "b": []}
    assert f.tensors == {} and f.metadata_end == f.file_size


def test_version_2_reads_like_3(tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(tiny_file()[:4] + u32(2) + tiny_file()[8:])
    assert GGUFFile(path).version == 2


# -- hostile files --------------------------------------------------------------------------------

def one_kv(vtype: int, payload: bytes, key: str = "a") -> bytes:
    return gguf_bytes([kv(key, vtype, payload)])


def one_tensor(dims, ggml_type: int = T.F32, offset: int = 0, data: bytes = F32_ROWS) -> bytes:
    return gguf_bytes([ARCH], [tensor_info("x", dims, ggml_type, offset)], data)


def two_tensors(first, second) -> bytes:
    return gguf_bytes([ARCH], [tensor_info("x", *first), tensor_info("y", *second)], F32_ROWS)


def with_alignment(vtype: int, payload: bytes) -> bytes:
    return gguf_bytes([ARCH, kv("general.alignment", vtype, payload)], [tensor_info("x", [8, 2])], F32_ROWS)


def past_end_uint8() -> bytes:
    """A UINT8 array claiming one byte more than the whole file holds."""
    size = len(one_kv(V.ARRAY, array(V.UINT8, 0, bytes(1000))))
    return one_kv(V.ARRAY, array(V.UINT8, size + 1, bytes(1000)))


def deep_arrays(depth: int) -> bytes:
    return one_kv(V.ARRAY, array(V.ARRAY, 1) * depth + array(V.INT8, 0))


# (case, file bytes, a fragment of the expected message)
HOSTILE = [
    ("numeric array count 2^50", one_kv(V.ARRAY, array(V.UINT32, 2**50)),
     "4503599627370496 bytes for the 1125899906842624 items of 'a' at offset 49, but only 0 are left"),
    ("numeric array count 2^63", one_kv(V.ARRAY, array(V.FLOAT64, 2**63)), "bytes for the 9223372036854775808 items of 'a'"),
    ("string array count 2^60", one_kv(V.ARRAY, array(V.STRING, 2**60)), "bytes for the 1152921504606846976 items of 'a'"),
    ("string length 2^62", one_kv(V.STRING, u64(2**62)), "4611686018427387904 bytes for the value of 'a' at offset 45"),
    ("string item length 2^62", one_kv(V.ARRAY, array(V.STRING, 2, string("ok") + u64(2**62))),
     "4611686018427387904 bytes for item 1 of 'a' at offset 67"),
    ("key length 2^64-1", gguf_bytes([u64(2**64 - 1) + bytes(16)], n_kv=1), "18446744073709551615 bytes for key #0"),
    ("uint8 array longer than the file", past_end_uint8(), "1050 bytes for the 1050 items of 'a' at offset 49, but only 1000 are left"),
    ("tensor count 10^12", gguf_bytes([ARCH], n_tensors=10**12), "1000000000000 tensors need at least 32000000000000 bytes"),
    ("kv count 10^12", gguf_bytes([ARCH], n_kv=10**12), "1000000000000 key/value pairs need at least 13000000000000 bytes"),
    ("array of 2^60 arrays", one_kv(V.ARRAY, array(V.ARRAY, 2**60)), "bytes for the 1152921504606846976 items of 'a'"),
    ("arrays nested 100000 deep", deep_arrays(100_000), "metadata key 'a' nests arrays more than 8 deep"),
    ("nested array count 2^50", one_kv(V.ARRAY, array(V.ARRAY, 2, array(V.INT8, 0) + array(V.UINT64, 2**50))),
     "9007199254740992 bytes for an array nested in 'a' at offset 73"),
    ("unknown value type", one_kv(13, u32(0)), "metadata key 'a' has unknown value type 13"),
    ("unknown value type 2^32-1", one_kv(2**32 - 1, u32(0)), "metadata key 'a' has unknown value type 4294967295"),
    ("unknown array item type", one_kv(V.ARRAY, array(99, 1, u32(0))), "'a' holds an array of unknown value type 99"),
    ("key not UTF-8", gguf_bytes([string(b"\xff") + u32(V.UINT8) + b"\0"]), "key #0 is not valid UTF-8"),
    ("string item not UTF-8", one_kv(V.ARRAY, array(V.STRING, 2, string("ok") + string(b"\xc3("))),
     "item 1 of 'a' is not valid UTF-8"),
    ("duplicate key", gguf_bytes([ARCH, kv("a", V.UINT8, b"\1"), kv("a", V.UINT8, b"\2")]), "duplicate metadata key 'a'"),
    ("version 1", gguf_bytes([ARCH], version=1), "unsupported GGUF version 1; supported: 2, 3"),
    ("big-endian", gguf_bytes([ARCH], version=3 << 24), "(a big-endian file?)"),
    ("alignment 0", with_alignment(V.UINT32, u32(0)), "general.alignment must be a power of two, not 0"),
    ("alignment 3", with_alignment(V.UINT32, u32(3)), "general.alignment must be a power of two, not 3"),
    ("alignment a string", with_alignment(V.STRING, string("32")), "general.alignment must be a power of two, not '32'"),
    ("unknown tensor type", one_tensor([8, 2], 4), "tensor 'x' has unknown ggml type 4"),
    ("unknown tensor type 2^32-1", one_tensor([8, 2], 2**32 - 1), "tensor 'x' has unknown ggml type 4294967295"),
    ("tensor offset 2^64-1", one_tensor([8, 2], T.F32, 2**64 - 1),
     "tensor 'x' starts at offset 18446744073709551615, not a multiple of the alignment 32"),
    ("aligned tensor offset 2^64-32", one_tensor([8, 2], T.F32, 2**64 - 32),
     "file is truncated or corrupt: tensor 'x' (F32, shape (2, 8)) ends at byte 18446744073709551776"),
    ("misaligned tensor offset", two_tensors(([8, 2],), ([8, 1], T.F32, 68)), "tensor 'y' starts at offset 68"),
    ("overlapping tensors", two_tensors(([8, 2],), ([8, 2], T.F32, 32)), "tensors 'x' and 'y' overlap (bytes 192-224)"),
    ("tensors at the same offset", two_tensors(([8, 2],), ([8, 1],)), "tensors 'y' and 'x' overlap"),
    ("tensor past the end", two_tensors(([8, 2],), ([8, 3], T.F32, 64)),
     "file is truncated or corrupt: tensor 'y' (F32, shape (3, 8)) ends at byte 320 but the file has 288 bytes"),
    ("gap between tensors", two_tensors(([8, 1],), ([8, 2], T.F32, 64)),
     "tensor 'y' starts at byte 224 but tensor 'x' ends at byte 192: 32 bytes that no tensor holds"),
    ("first tensor after the data start", one_tensor([8, 2], T.F32, 64),
     "tensor 'x' starts at byte 192 but the data section starts at byte 128: 64 bytes"),
    ("a smaller type leaving bytes unread", one_tensor([8, 2], T.F16),
     "96 bytes after the end of the last tensor 'x' (byte 160) that no tensor holds"),
    ("duplicate tensor name", gguf_bytes([ARCH], [tensor_info("x", [8, 2]), tensor_info("x", [8, 2], T.F32, 64)], F32_ROWS),
     "duplicate tensor name 'x'"),
    ("zero dimension", one_tensor([8, 0]), "tensor 'x' has a zero dimension (shape (0, 8))"),
    ("dimension -1 (2^64-1)", one_tensor([8, 2**64 - 1]), "tensor 'x' (F32, shape (18446744073709551615, 8)) ends at byte"),
    ("dims multiplying past 2^64", one_tensor([2**32, 2**32, 2**32, 2]), "tensor 'x' (F32, shape (2, 4294967296,"),
    ("row not whole blocks", one_tensor([33, 2], T.Q4_0, data=bytes(64)),
     "tensor 'x': row length 33 is not a multiple of Q4_0's block size 32"),
    ("5 dimensions", one_tensor([1, 1, 1, 1, 8]), "tensor 'x' has 5 dimensions (1 to 4 are possible)"),
    ("0 dimensions", one_tensor([]), "tensor 'x' has 0 dimensions"),
    ("2^32-1 dimensions", gguf_bytes([ARCH], [string("x") + u32(2**32 - 1)], F32_ROWS), "tensor 'x' has 4294967295 dimensions"),
]


def open_hostile(path) -> tuple[str, float, int]:
    """GGUFFile(path)'s error message, the seconds it took and the peak memory it allocated."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a numpy RuntimeWarning (overflow...) fails the test
            with pytest.raises(GGUFError) as e:
                GGUFFile(path)
        return str(e.value), time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("case,data,expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_file_is_one_quick_error(case, data, expected, tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    message, seconds, peak = open_hostile(path)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert expected in message, message
    assert seconds < 2, (case, seconds)
    assert peak < 1 << 20, (case, peak)  # the files are tiny: nothing sized by a claimed count


def test_truncation_at_every_byte(tmp_path):
    data = tiny_file()
    whole = GGUFFile(_write(tmp_path / "whole.gguf", data))
    assert whole.tensors["y"].data.view(np.float32).tolist() == [list(range(16, 24)), list(range(24, 32))]
    path = tmp_path / "cut.gguf"
    for cut in range(len(data)):
        message, seconds, _ = open_hostile(_write(path, data[:cut]))
        expected = "not a GGUF file" if cut < 4 else "truncated"
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, (cut, message)
        assert seconds < 2, (cut, seconds)


def test_big_headers_cost_in_proportion(tmp_path):
    """Valid but big: a UINT8 array as long as the file (gguf's reader took 2.7 GB in 60 s on one)
    costs a list of that many ints; a 1 MB key holding 100k nested arrays costs no 1 MB per array."""
    n = 4 << 20
    path = _write(tmp_path / "long.gguf", one_kv(V.ARRAY, array(V.UINT8, n, bytes(n))))
    start = time.perf_counter()
    assert GGUFFile(path).metadata["a"] == [0] * n
    assert time.perf_counter() - start < 2
    key, n = "k" * (1 << 20), 100_000
    path = _write(tmp_path / "nested.gguf", one_kv(V.ARRAY, array(V.ARRAY, n, array(V.INT8, 0) * n), key))
    start = time.perf_counter()
    assert GGUFFile(path).metadata[key] == [[]] * n
    assert time.perf_counter() - start < 2


def test_opening_errors(tmp_path):
    for name, data, expected in [("empty", b"", "not a GGUF file (magic b''"), ("ggml", b"GGML" + bytes(20), "magic b'GGML'")]:
        message, _, _ = open_hostile(_write(tmp_path / f"{name}.gguf", data))
        assert expected in message
    assert "No such file" in open_hostile(tmp_path / "missing.gguf")[0]
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # opening a FIFO for reading would wait for a writer forever
    for path, kind in ((tmp_path, "a directory"), (fifo, "a FIFO"), ("/dev/zero", "a device")):
        message, seconds, _ = open_hostile(path)
        assert message == f"{path}: not a regular file ({kind})" and seconds < 2


