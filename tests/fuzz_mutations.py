"""The fuzz test's mutation kinds: each a function (random generator, parsed base file) →
(description, mutant bytes). See `gguf_layout` for the layout and the rule every kind follows:
a mutant is damage — or changes nothing the model computes — never a different valid model.

    mutants(data, per_kind=30, seed=0) → (kind, description, bytes) …, the same for a seed
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator

import numpy as np

from gguf_layout import (ARRAY, BOOL, F32, F64, I32, INTS, STRING, U8, U32, U64, T_F32, T_Q4_1, T_Q8_0, Layout,
                         assemble, encode, entries, kv, parse, patch, tensor_bytes)

HUGE = (2**32, 2**40, 2**50, 2**63, 2**64 - 1)
STRUCTURE = ("magic", "version", "count", "key length", "value type", "array item type", "array count",
             "string length", "tensor name length", "n_dims", "dim", "ggml type", "offset")
KINDS = {}


def kind(name):
    def register(f):
        KINDS[name] = f
        return f
    return register


def mutants(data: bytes, per_kind: int = 30, seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """One at a time: a real model's mutants are as large as the model."""
    L = parse(data)
    for name, make in KINDS.items():
        rng = random.Random(f"{seed}:{name}")
        for _ in range(per_kind):
            yield (name, *make(rng, L))


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


@kind("truncation")
def truncation(rng, L: Layout):
    cut = rng.randrange(0, L.header_end) if rng.random() < 0.6 else rng.randrange(L.header_end, len(L.data))
    return f"cut at byte {cut} of {len(L.data)}", L.data[:cut]


def _checked_key_names(L: Layout) -> list[tuple[str, int, int]]:
    """(key, first byte, end) of the key names whose namespace the loader reads completely (a
    renamed key there is refused); the namespace prefix itself is left alone."""
    arch = kv(L, "general.architecture").value
    out = []
    for k in L.kvs:
        for prefix in (f"{arch}.", "tokenizer.ggml.", "general.architecture"):
            if k.key.startswith(prefix):
                skip = len(prefix.encode()) if prefix.endswith(".") else 0
                out.append((k.key, k.name[0] + skip, k.name[1]))
    return out


@kind("bit flip")
def bit_flip(rng, L: Layout):
    what = rng.choice(STRUCTURE + ("key name", "tensor name"))
    if what == "key name":
        _, lo, hi = rng.choice(_checked_key_names(L))
        pos = rng.randrange(lo, hi)
    elif what == "tensor name":
        pos = rng.randrange(*rng.choice(L.tensors).name_span)
    else:
        at, size = rng.choice(L.fields[what])
        pos = at + rng.randrange(size)
    bit = rng.randrange(8)
    return f"{what}: bit {bit} of byte {pos}", patch(L.data, pos, bytes([L.data[pos] ^ (1 << bit)]))


@kind("huge count or length")
def huge(rng, L: Layout):
    what = rng.choice(("count", "array count", "key length", "string length", "tensor name length"))
    at, _ = rng.choice(L.fields[what])
    value = rng.choice(HUGE + (len(L.data), len(L.data) + 1, len(L.data) // 4 + 1))
    return f"{what} at byte {at} = {value}", patch(L.data, at, _u64(value))


@kind("odd dims")
def odd_dims(rng, L: Layout):
    t = rng.choice(L.tensors)
    if rng.random() < 0.25:
        n = rng.choice((0, 3, 5, 2**32 - 1))
        return f"{t.name}: n_dims = {n}", patch(L.data, t.dims_at[0] - 4, struct.pack("<I", n))
    i = rng.randrange(len(t.dims))
    d = t.dims[i]
    value = rng.choice([v for v in (0, 1, 3, d + 1, d - 1, 2 * d, d // 2, 2**31, 2**32, 2**63, 2**64 - 1) if v != d])
    return f"{t.name}: dim {i} = {value} (was {d})", patch(L.data, t.dims_at[i], _u64(value))


@kind("offsets")
def offsets(rng, L: Layout):
    t = rng.choice(L.tensors)
    other = rng.choice([u for u in L.tensors if u is not t])
    choices = [t.offset + 32, t.offset + 1, t.offset + 16, other.offset, 2**64 - 1, 2**64 - 32, len(L.data),
               t.offset + 2**32] + ([t.offset - 32, 0] if t.offset else [])
    value = rng.choice(choices)
    return f"{t.name}: offset = {value} (was {t.offset})", patch(L.data, t.offset_at, _u64(value))


@kind("type ids")
def type_ids(rng, L: Layout):
    t = rng.choice(L.tensors)
    value = rng.choice([v for v in range(42) if v != t.ggml_type] + [2**31, 2**32 - 1])
    return f"{t.name}: ggml type {t.ggml_type} → {value}", patch(L.data, t.type_at, struct.pack("<I", value))


@kind("alignment")
def alignment(rng, L: Layout):
    vtype, value = rng.choice([(U32, v) for v in (0, 1, 2, 3, 8, 16, 31, 32, 33, 64, 128, 4096, 2**31)]
                              + [(STRING, "32"), (F32, 32.0), (I32, -32), (U64, 2**64 - 1), (BOOL, True)])
    kvs, infos = entries(L)
    kvs.insert(rng.randrange(len(kvs) + 1), encode("general.alignment", vtype, value))
    return f"general.alignment = {value!r} (type {vtype})", assemble(L, kvs, infos)


@kind("duplicate keys")
def duplicates(rng, L: Layout):
    kvs, infos = entries(L)
    if rng.random() < 0.75:
        i = rng.randrange(len(kvs))
        kvs.insert(rng.randrange(len(kvs) + 1), kvs[i])
        return f"key {L.kvs[i].key!r} twice", assemble(L, kvs, infos)
    i = rng.randrange(len(infos))
    infos.insert(rng.randrange(len(infos) + 1), infos[i])
    return f"tensor {L.tensors[i].name!r} twice", assemble(L, kvs, infos)


def _retyped(rng, k) -> tuple[int, object, int | None]:
    """Another GGUF type for `k`'s value: the same value where that type holds it exactly, else
    a value no reader could take for the original (a string, an array, a bool)."""
    v = k.value
    if k.vtype in INTS:
        same = [t for t, lo, hi in ((U8, 0, 255), (I32, -2**31, 2**31 - 1), (U32, 0, 2**32 - 1), (U64, 0, 2**64 - 1))
                if lo <= v <= hi and t != k.vtype]
        return rng.choice([(t, v, None) for t in same] + [(F32, float(v), None), (STRING, str(v), None),
                                                         (BOOL, bool(v), None), (ARRAY, [v], U32 if v >= 0 else I32)])
    if k.vtype == F32:
        return rng.choice([(F64, v, None), (STRING, repr(v), None), (ARRAY, [v], F32)]
                          + ([(U32, int(v), None)] if float(v).is_integer() and v >= 0 else []))
    if k.vtype == BOOL:
        return rng.choice([(U8, int(v), None), (I32, int(v), None), (STRING, str(v).lower(), None), (F32, float(v), None)])
    if k.vtype == STRING:
        return rng.choice([(U32, len(v), None), (ARRAY, [v], STRING), (BOOL, True, None)])
    # arrays: a scalar, or the items as another type
    item = k.item_type
    first = v[0] if v else 0
    options = [(item, first, None), (ARRAY, [[x] for x in v[:3]], (ARRAY, item))]
    if item == STRING:
        options += [(ARRAY, [len(x) for x in v], I32), (ARRAY, [float(len(x)) for x in v], F32)]
    elif item in INTS:
        options += [(ARRAY, [str(x) for x in v], STRING), (ARRAY, [float(x) for x in v], F32)]
    else:
        options += [(ARRAY, [str(x) for x in v], STRING), (ARRAY, [int(x) for x in v], I32)]
    return rng.choice(options)


def _replace(L: Layout, key: str, vtype: int, value, item=None) -> bytes:
    kvs, infos = entries(L)
    i = next(i for i, k in enumerate(L.kvs) if k.key == key)
    kvs[i] = encode(key, vtype, value, item)
    return assemble(L, kvs, infos)


@kind("wrong-typed metadata")
def wrong_type(rng, L: Layout):
    k = rng.choice(L.kvs)
    vtype, value, item = _retyped(rng, k)
    shown = f"{len(value)} items" if isinstance(value, list) else repr(value)
    return f"{k.key}: type {k.vtype} → {vtype}/{item} ({shown})", _replace(L, k.key, vtype, value, item)


@kind("broken vocab arrays")
def vocab(rng, L: Layout):
    arrays = [k for k in L.kvs if k.key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")]
    tokens, types = kv(L, "tokenizer.ggml.tokens"), kv(L, "tokenizer.ggml.token_type")
    n = len(tokens.value)
    byte_ids = [i for i, t in enumerate(types.value) if t == 6]  # a SentencePiece vocabulary's byte tokens
    ids = [k.key for k in L.kvs if k.key.endswith("_token_id")]
    damage = rng.choice(("shorter", "longer", "duplicate", "id out of range", "id wrong type")
                        + (("byte retyped", "byte renamed") if len(byte_ids) > 1 else ())
                        + (("score not finite",) if any(k.key.endswith("scores") for k in arrays) else ()))
    if damage in ("shorter", "longer"):
        k = rng.choice(arrays)
        if damage == "shorter":
            value = k.value[: -rng.randint(1, 3)]
        else:
            value = k.value + ([f"zz{i}" for i in range(3)] if k is tokens else [{I32: 1, F32: 0.0}[k.item_type]] * 3)
        return f"{k.key}: {len(value)} items for {n}", _replace(L, k.key, ARRAY, value, k.item_type)
    if damage == "duplicate":
        i, j = rng.sample(range(n), 2)
        return f"token {j} := token {i}", _replace(L, tokens.key, ARRAY, _set(tokens.value, j, tokens.value[i]), STRING)
    if damage == "byte retyped":
        byte = rng.choice(byte_ids)
        return f"byte token {byte} typed NORMAL", _replace(L, types.key, ARRAY, _set(types.value, byte, 1), I32)
    if damage == "byte renamed":
        byte, other = rng.sample(byte_ids, 2)
        text = rng.choice(("<0xZZ>", "<0x4G>", "x", tokens.value[other], tokens.value[other].lower()))
        return f"byte token {byte} renamed {text!r}", _replace(L, tokens.key, ARRAY, _set(tokens.value, byte, text), STRING)
    key = rng.choice(ids)
    if damage == "id out of range":
        vtype, value = rng.choice([(U32, n), (U32, n + 7), (U32, 2**32 - 1), (I32, -1)])
        return f"{key} = {value}", _replace(L, key, vtype, value)
    if damage == "id wrong type":
        vtype, value, item = rng.choice([(STRING, "1", None), (ARRAY, [1], U32), (F32, 1.0, None), (BOOL, True, None)])
        return f"{key} as type {vtype}", _replace(L, key, vtype, value, item)
    scores = kv(L, "tokenizer.ggml.scores")
    i = rng.randrange(n)
    return f"score {i} not finite", _replace(L, scores.key, ARRAY, _set(scores.value, i, rng.choice((math.nan, math.inf))), F32)


def _set(items: list, i: int, value) -> list:
    items = list(items)
    items[i] = value
    return items


NAN, INF = math.nan, math.inf


def bad_values(L: Layout) -> dict[str, list[tuple[int, object]]]:
    """Values no model of the base file's tensors can have, from its own (a hyper-parameter of a
    different valid model, such as another RoPE base, would be no damage to detect): key →
    (type, value) pairs. The file is llama-like with `rope.dimension_count` = the head size."""
    arch = kv(L, "general.architecture").value
    get = {k.key[len(arch) + 1 :]: k.value for k in L.kvs if k.key.startswith(arch + ".")}
    n, e, f = get["block_count"], get["embedding_length"], get["feed_forward_length"]
    h, g = get["attention.head_count"], get["attention.head_count_kv"]
    d = get.get("attention.key_length", e // h)
    u32 = lambda *vs: [(U32, v) for v in vs if v >= 0]  # noqa: E731
    f32 = lambda *vs: [(F32, v) for v in vs]  # noqa: E731
    return {
        "block_count": u32(0, n - 1, n + 1, 2**16, 10**9, 2**32 - 1) + [(I32, -1), (I32, -n)],
        "embedding_length": u32(0, e // 2, e - 1, e + 1, 2 * e, 2**32 - 1),
        "feed_forward_length": u32(0, f // 2, f - 1, 2 * f, 2**31),
        "attention.head_count": u32(0, 2 * h, 4 * h, 2**32 - 1) + [(I32, -h)],
        "attention.head_count_kv": u32(0, g + 1, 2 * g, h + 1) + [(I32, -g)],
        "rope.dimension_count": u32(0, 3, d - 1, d + 1, d + 2, 1000 * d, 2**32 - 16) + [(I32, -16)],
        "rope.freq_base": f32(0.0, -10000.0, NAN, INF, -INF),
        "attention.layer_norm_rms_epsilon": f32(0.0, -1e-5, NAN, INF, -INF),
        "vocab_size": u32(0, len(kv(L, "tokenizer.ggml.tokens").value) - 1, len(kv(L, "tokenizer.ggml.tokens").value) + 1,
                          2**32 - 1),
        "context_length": u32(0, 2**32 - 1) + [(I32, -1)],
        # keys the base files lack
        "attention.key_length": u32(0, d // 2, d - 1, d + 1, 2 * d, 2**32 - 1),
        "attention.value_length": u32(0, d // 2, 2 * d),
        "rope.scaling.factor": f32(-1.0, NAN, INF, -INF),
        "rope.scaling.attn_factor": f32(0.0, -1.0, NAN, INF),
    }


# tensors the base file's model has no place for: a layer past block_count, a bias in one layer
# only, names no llama model has
PHANTOMS = ("blk.{n}.attn_norm.weight", "blk.0.attn_q.bias", "blk.{last}.ffn_down.bias", "token_embd_norm.weight",
            "blk.0.phantom.weight", "output_norm.bias")


@kind("hyper-parameters and tensors")
def hyper(rng, L: Layout):
    """The issue's wrong answers and tracebacks: a layer count, head count, RoPE or epsilon value
    no model of these tensors can have, or a tensor the model does not use."""
    arch = kv(L, "general.architecture").value
    if rng.random() < 0.15:
        n = kv(L, f"{arch}.block_count").value
        name = rng.choice(PHANTOMS).format(n=n, last=n - 1)
        kvs, infos = entries(L)
        end = len(L.data) - L.data_start  # the data section's length: the base file ends aligned
        infos.append(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IQIQ", 1, 64, T_F32, end))
        return f"phantom tensor {name}", assemble(L, kvs, infos) + np.ones(64, np.float32).tobytes()
    values = bad_values(L)
    key = rng.choice(list(values))
    vtype, value = rng.choice(values[key])
    kvs, infos = entries(L)
    entry = encode(f"{arch}.{key}", vtype, value)
    present = [i for i, k in enumerate(L.kvs) if k.key == f"{arch}.{key}"]
    if present:
        kvs[present[0]] = entry
    else:
        kvs.insert(rng.randrange(len(kvs) + 1), entry)
    return f"{arch}.{key} = {value} (type {vtype})", assemble(L, kvs, infos)


@kind("NaN data")
def nan_data(rng, L: Layout):
    t = rng.choice(L.tensors)
    start = L.data_start + t.offset
    if t.ggml_type == T_F32:
        i = rng.randrange(tensor_bytes(t) // 4)
        value = np.array([rng.choice((np.nan, np.inf, -np.inf))], np.float32)
        return f"{t.name}: weight {i} = {value[0]}", patch(L.data, start + 4 * i, value.tobytes())
    size = {T_Q4_1: 20, T_Q8_0: 34}[t.ggml_type]
    block = rng.randrange(tensor_bytes(t) // size)
    field = rng.choice((0, 2)) if t.ggml_type == T_Q4_1 else 0  # Q4_1: scale d, min m; Q8_0: scale d
    value = np.array([rng.choice((np.nan, np.inf, -np.inf))], np.float16)
    return f"{t.name}: block {block} field {field} = {value[0]}", patch(L.data, start + block * size + field, value.tobytes())
