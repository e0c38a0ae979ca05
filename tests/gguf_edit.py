"""Copy a GGUF file with changes: drop or retype metadata keys, reshape or drop tensors.

Used by the tests to make real broken files (a missing key, an ill-typed key, a tensor whose
shape disagrees with the config, a tensor nothing uses) from a good one.
"""

from __future__ import annotations

import gguf
import numpy as np

V = gguf.GGUFValueType


def rewrite_gguf(src, dst, *, drop_keys=(), set_keys=None, drop_tensors=(), tensor_shapes=None, add_tensors=None,
                 retype=None) -> None:
    """set_keys: key → (value, GGUFValueType); tensor_shapes: name → new numpy-order shape
    (the tensor's raw bytes are kept, so a new shape must hold the same number of elements);
    add_tensors: name → numpy array (float32) written after the file's own tensors; retype:
    name → (GGMLQuantizationType, its blocks as (rows, bytes per row) uint8), same shape."""
    set_keys = dict(set_keys or {})
    tensor_shapes = tensor_shapes or {}
    r = gguf.GGUFReader(src)
    arch = set_keys.pop("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys or key in set_keys:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == V.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in set_keys.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        shape = tuple(reversed([int(d) for d in t.shape]))
        if t.name in tensor_shapes:
            shape = tuple(tensor_shapes[t.name])
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        if t.name in (retype or {}):
            qtype, raw = retype[t.name][0], retype[t.name][1].reshape(-1)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        w.add_tensor(t.name, raw.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=qtype)
    for name, array in (add_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
