"""Compile every CUDA kernel of mlx_llama with NVRTC, here on the CPU, as MLX's CUDA backend would.

MLX compiles an `mx.fast.cuda_kernel` on the GPU host when it first runs: a typo costs a round trip.
1. capture: `mx.fast.cuda_kernel` is replaced by a recorder (outputs: zeros), every `available()` of
   mlx_llama/cuda_*.py forced True; the modules' kernel functions run in float16, bfloat16 and float32
   with tests/test_cuda_kernels.py's shapes, and tiny models decode a few tokens (real template args);
2. source: each distinct instantiation as MLX 0.32.4's custom_kernel.cpp writes it (checked byte for
   byte against MLX's verbose output on an H200): utils.cuh, <cooperative_groups.h>, the header, then
   `__global__ void custom_kernel_<name><template hash>(const T* in, [const __grid_constant__ Shape
   in_shape / Strides in_strides / int in_ndim where the source names them,] ..., T* out)`, its body
   opening with `constexpr int N = ..; constexpr bool B = ..; using T = ..;`;
3. compile: as jit_module.cpp: MLX's device headers in memory (from its CUDA library: --mlx-cuda, the
   installed MLX, or the GPU kit .gpu*/mlxcuda.part.* unpacked once into ~/.cache/mlx_llama/nvrtc),
   `--device-as-default-execution-space --gpu-architecture=sm_90a` (an H200's SASS), the include paths
   of MLX's headers, its CCCL and CUDA's; one program per header, then the kernels of a failed one alone.

Run: python scripts/check_nvrtc.py [-k NAME] [--dump DIR] [--self-test] [-v]   (about 15 s)
Prints "ok" or "ERROR" and NVRTC's log per instantiation; exit status 0 if all compile, else 1;
2 without NVRTC or MLX's CUDA build (neither is a project dependency: it prints how to get them).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import importlib
import io
import lzma
import multiprocessing
import os
import re
import struct
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ('NVRTC not found: pip install "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"  '
           "(the GPU host's versions; not a project dependency)")
NO_MLX = ("no MLX CUDA build found (its device headers are needed): pip download --no-deps mlx-cuda-13==0.32.4 "
          "-d /tmp/mlx-cuda, then pass --mlx-cuda /tmp/mlx-cuda/mlx_cuda_13-0.32.4-*.whl")
DEVICE = "mlx/backend/cuda/device/"
PREAMBLE = f'\n#include "{DEVICE}utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
CUDA_TYPE = {"bool": "bool", **{t: f"{t}_t" for t in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                                       "uint32", "uint64")},
             "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
             "complex64": "mlx::core::cu::complex64_t"}  # dtype_to_cuda_type
HASH_TYPE = {**CUDA_TYPE, "float16": "float16_t", "bfloat16": "bfloat16_t", "complex64": "complex64_t"}
SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
mx = None  # mlx.core, imported by `capture` once mlx_llama has put its BLAS in


# -- NVRTC through ctypes -----------------------------------------------------------------------

class Nvrtc:
    def __init__(self, path: Path):
        for builtins in path.parent.glob("libnvrtc-builtins.so.*"):  # NVRTC 13.0 looks on the loader's path
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.path, self.lib = path, ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        if hasattr(self.lib, "nvrtcSetPCHHeapSize"):  # room for the precompiled header of a lone compile
            self.lib.nvrtcSetPCHHeapSize(ctypes.c_size_t(1 << 29))
        v = (ctypes.c_int(), ctypes.c_int())
        self.lib.nvrtcVersion(*map(ctypes.byref, v))
        self.version = f"{v[0].value}.{v[1].value}"

    def compile(self, source: str, program: str, kernels: list[str], headers: dict[str, bytes],
                options: list[str]) -> tuple[bool, str]:
        """(ok, log) of one program as jit_module.cpp's compile(): the headers in memory, each kernel
        a name expression whose lowered name must exist."""
        lib, prog = self.lib, ctypes.c_void_p()
        arr = lambda xs: (ctypes.c_char_p * max(1, len(xs)))(*[x if isinstance(x, bytes) else x.encode() for x in xs])
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{program}.cu".encode(), len(headers),
                                    arr(list(headers.values())), arr(list(headers)))
        if rc:
            return False, f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}"
        try:
            for k in kernels:
                lib.nvrtcAddNameExpression(prog, k.encode())
            rc = lib.nvrtcCompileProgram(prog, len(options), arr(options))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace").strip()
            if rc:
                return False, text or lib.nvrtcGetErrorString(rc).decode()
            for k in kernels:  # as MLX asks for each kernel's mangled name
                if lib.nvrtcGetLoweredName(prog, k.encode(), ctypes.byref(ctypes.c_char_p())):
                    return False, f"nvrtcGetLoweredName({k}) failed: the source does not define that kernel"
            return True, text
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_nvrtc() -> tuple[Path, Path] | None:
    """libnvrtc and the CUDA headers: the nvidia/cu13 wheels (where MLX looks first), else CUDA_HOME."""
    for d in map(Path, filter(None, sys.path)):
        if (d / "nvidia/cu13/lib/libnvrtc.so.13").exists() and (d / "nvidia/cu13/include").is_dir():
            return d / "nvidia/cu13/lib/libnvrtc.so.13", d / "nvidia/cu13/include"
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    libs = sorted(home.glob("lib64/libnvrtc.so*"))
    return (libs[0], home / "include") if libs and (home / "include").is_dir() else None


_worker: dict = {}  # a compiling process's NVRTC and headers


def _init(path: str, headers: dict[str, bytes]):
    _worker.update(nvrtc=Nvrtc(Path(path)), headers=headers)


def _job(source: str, program: str, kernels: list[str], options: list[str]) -> tuple[bool, str]:
    return _worker["nvrtc"].compile(source, program, kernels, _worker["headers"], options)


# -- MLX's device headers: the jit_source_* strings of a CUDA build of libmlx.so ----------------

def jit_sources(lib: bytes) -> dict[str, bytes]:
    """{include name: text}: jit_module.cpp's arrays g_include_names and g_headers, pointers found
    through their R_X86_64_RELATIVE relocations ({} for a library without them)."""
    (phoff,), (phentsize, phnum) = struct.unpack_from("<Q", lib, 0x20), struct.unpack_from("<HH", lib, 0x36)
    (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", lib, 0x28), struct.unpack_from("<HH", lib, 0x3A)
    loads = [struct.unpack_from("<IIQQQQ", lib, phoff + i * phentsize) for i in range(phnum)]
    loads = [(off, va, size) for kind, _, off, va, _, size in loads if kind == 1]  # PT_LOAD
    relocs = {}
    for i in range(shnum):
        _, kind, _, _, off, size = struct.unpack_from("<IIQQQQ", lib, shoff + i * shentsize)
        if kind == 4:  # SHT_RELA
            relocs.update((o, a) for o, info, a in struct.iter_unpack("<QQq", lib[off:off + size]) if info & 0xFFFFFFFF == 8)

    def string(va: int) -> bytes:
        off = next((va - v + o for o, v, n in loads if v <= va < v + n), None)
        return b"" if off is None else lib[off:lib.index(b"\0", off)]

    names = {s for s, va in relocs.items() if string(va).startswith(DEVICE.encode())}
    for start in sorted(s for s in names if s - 8 not in names):
        n = next(k for k in range(len(names) + 1) if start + 8 * k not in names)
        for delta in sorted(range(-4096, 4097, 8), key=abs):  # g_headers: n pointers beside the names
            slots = [start + delta + 8 * i for i in range(n)]
            if delta and all(s in relocs and s not in names for s in slots):
                texts = {string(relocs[start + 8 * i]).decode(): string(relocs[s]) for i, s in enumerate(slots)}
                if b"#pragma once" in texts.get(f"{DEVICE}utils.cuh", b""):
                    return texts
    return {}


def unpacked(archive: list[Path]) -> Path:
    """The MLX CUDA package of a wheel or of the GPU kit (an xz tar in parts), unpacked once into the cache."""
    key = hashlib.sha1(repr([(p.name, p.stat().st_size) for p in archive]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_llama/nvrtc" / key
    wanted = ("mlx/lib/libmlx.so", "mlx/include/")
    if not (cache / "mlx/.unpacked").exists():
        print(f"unpacking MLX's CUDA library and headers from {archive[0]} into {cache}", flush=True)
        if archive[0].suffix == ".whl":
            with zipfile.ZipFile(archive[0]) as z:
                z.extractall(cache, [n for n in z.namelist() if n.startswith(wanted)])
        else:
            with tarfile.open(fileobj=lzma.LZMAFile(io.BytesIO(b"".join(p.read_bytes() for p in archive))), mode="r|") as t:
                t.extractall(cache, (m for m in t if m.name.removeprefix("./").startswith(wanted)), filter="data")
        (cache / "mlx/.unpacked").touch()
    return cache / "mlx"


def mlx_headers(arg: str | None, cuda_include: Path) -> tuple[dict[str, bytes], list[str], str] | None:
    """(in-memory headers, --include-path list as MLX's: its headers, its CCCL, CUDA's; origin) of an MLX
    CUDA build: --mlx-cuda (a package folder or wheel), else the installed MLX, then the GPU kit's."""
    def builds():
        if arg:
            yield unpacked([Path(arg)]) if arg.endswith(".whl") else Path(arg)
            return
        yield from map(Path, importlib.import_module("mlx").__path__)
        kit = sorted(ROOT.glob(".gpu*/mlxcuda.part.*"), key=lambda p: p.name)
        if len(kit) > 1:
            yield unpacked(kit)

    for root in (r for c in builds() for r in (c, c / "mlx")):
        if (root / "lib/libmlx.so").exists() and (jit := jit_sources((root / "lib/libmlx.so").read_bytes())):
            return jit, [str(root / "include"), str(root / "include/cccl"), str(cuda_include)], f"MLX CUDA build at {root}"
    return None


# -- the source MLX generates (custom_kernel.cpp: build_kernel, template_arguments_hash) --------

@dataclasses.dataclass
class Launch:
    name: str
    input_names: list[str]
    output_names: list[str]
    source: str
    header: str
    inputs: list[tuple[str, int]]  # (dtype, ndim)
    outputs: list[str]  # dtypes
    template: list[tuple[str, object]]  # int, bool, or a dtype as ("dtype", name)
    origin: str = ""

    def kernel_name(self) -> str:
        return "custom_kernel_" + self.name + "".join(
            ("_t" if v else "_f") if isinstance(v, bool) else f"_{HASH_TYPE[v[1]]}" if isinstance(v, tuple) else f"_{v}"
            for _, v in self.template)

    def body(self) -> str:
        """The source after the preamble and the header: the kernel in MLX's namespace."""
        src = ["namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
               f"__global__ void {self.kernel_name()}(\n"]
        for n, (dt, ndim) in zip(self.input_names, self.inputs):
            src.append(f"    const {CUDA_TYPE[dt]}* {n},\n")
            src += [f"    const __grid_constant__ {kind} {n}{suffix},\n" for suffix, kind in
                    (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")) if ndim and n + suffix in self.source]
        src.append(",\n".join(f"    {CUDA_TYPE[dt]}* {n}" for n, dt in zip(self.output_names, self.outputs)) + ") {\n")
        src += [f"  constexpr bool {n} = {str(v).lower()};\n" if isinstance(v, bool) else
                f"  using {n} = {CUDA_TYPE[v[1]]};\n" if isinstance(v, tuple) else f"  constexpr int {n} = {v};\n"
                for n, v in self.template]
        return "".join(src) + ("\n" if self.template else "") + self.source + "\n}\n\n} // namespace mlx::core::cu\n"

    def build(self) -> str:
        return PREAMBLE + self.header + self.body()

    def summary(self) -> str:
        args = " ".join(f"{n}={SHORT.get(v[1], v[1]) if isinstance(v, tuple) else v}" for n, v in self.template)
        return f"{args} ({','.join(SHORT.get(d, d) for d, _ in self.inputs)})"


class Recorder:
    """Stands in for mx.fast.cuda_kernel: records each launch's instantiation, returns zeros."""

    def __init__(self):
        self.launches: dict[tuple[str, str], Launch] = {}
        self.origin, self.last, self.count, self.modules = "", None, 0, set()

    def cuda_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                    shared_memory=0):
        spec = {"name": name, "input_names": list(input_names), "output_names": list(output_names),
                "source": source, "header": header}
        frame = sys._getframe(1)
        if frame.f_code.co_name == "kernel":  # through cuda_affine.kernel, which makes every module's kernels
            frame = frame.f_back
        module = frame.f_globals.get("__name__", "")
        return lambda **kw: (self.modules.add(module), self.launch(spec, **kw))[1]

    def launch(self, spec, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
               init_value=None, verbose=False, stream=None):
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        if len(arrays) != len(spec["input_names"]) or not (
                len(output_shapes) == len(output_dtypes) == len(spec["output_names"])):
            raise ValueError(f"[custom_kernel] {spec['name']}: inputs or outputs do not match their names")
        dtype = lambda d: str(d).rsplit(".", 1)[-1]
        targs = [(n, ("dtype", dtype(v)) if isinstance(v, mx.Dtype) else v) for n, v in template or []]
        self.last = Launch(**spec, inputs=[(dtype(a.dtype), a.ndim) for a in arrays],
                           outputs=[dtype(d) for d in output_dtypes], template=targs, origin=self.origin)
        self.launches.setdefault((self.last.kernel_name(), self.last.build()), self.last)
        self.count += 1
        return [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]


# -- what runs the kernels: direct calls (the tests' shapes) and tiny models' decoding ----------

DTYPES = ("float16", "bfloat16", "float32")
MODELS = [("llama", "Q4_0", {}), ("llama", "Q4_1", {}), ("llama", "Q8_0", {}),  # SiLU; Q4_0/Q8_0 symmetric
          ("gemma3", "Q4_0", {"arch": "gemma3", "n_layers": 3, "softcap": 20.0}),  # GELU, sliding window
          ("qwen3", "Q8_0", {"arch": "qwen3", "head_dim": 32, "n_kv_heads": 1}),  # q/k norms, head size 32
          ("fused-qkv", "Q4_0", {"fused_qkv": True, "biases": ("attn_qkv", "attn_output", "ffn_down")}),
          ("qk-fused-alone", {"default": "Q4_0", "attn_v": "Q8_0"}, {})]  # v of another form: attn_qk and attn_v


def _affine(fn, dt, bits, nt=1, rows=70, k=1056, **kw):
    wq, scales, biases = mx.quantize(mx.zeros((rows, k), dt), group_size=32, bits=bits)
    x = mx.zeros((nt, k * (2 if kw.get("act") else 1)), dt)
    return fn(x, wq, scales, biases, **kw) if fn.__module__.endswith("mma") else fn(x, wq, scales, biases, bits, **kw)


def _affine_norm(fn, dt, nt=1, rows=70, k=1056, **kw):
    wq, scales, biases = mx.quantize(mx.zeros((rows, k), dt), group_size=32, bits=4)
    from mlx_llama.cuda_affine import new_counter

    return fn(mx.zeros((nt, k), dt), wq, scales, biases, 4, mx.zeros((nt, rows), dt), mx.zeros((rows,), dt), 1e-5,
              new_counter(), **kw)


def _blocks(mod, dt, ggml_type, nt=0, **kw):  # nt 0: dequantize
    import numpy as np

    from mlx_llama import quants

    rows, nb, size = 39, 6, {quants.Q6_K: 210, quants.Q2_K: 84}[ggml_type]
    fields = quants.split_blocks(ggml_type, np.zeros((rows, nb, size), np.uint8)).fields
    if not nt:
        return mod.dequantize(ggml_type, fields, dt)
    return mod.block_matvec(mx.zeros((nt, nb * 256 * (2 if kw.get("act") else 1)), dt), ggml_type, fields, **kw)


def _q6_k_norm(mod, dt, nt):
    import numpy as np

    from mlx_llama import quants
    from mlx_llama.cuda_affine import new_counter

    rows, nb = 39, 6
    fields = quants.split_blocks(quants.Q6_K, np.zeros((rows, nb, 210), np.uint8)).fields
    return mod.block_matvec_add_norm(mx.zeros((nt, nb * 256), dt), fields, mx.zeros((nt, rows), dt), mx.zeros((rows,), dt),
                                     1e-5, new_counter())


def _attention(mod, dt, d, hq, hkv, window, rope=None, cap=768, in_place=False, split=False):
    if split:  # the capacity over several blocks per head, and the kernel that combines them
        os.environ["MLX_LLAMA_ATTENTION_SPLIT_FROM"] = "1024"
    try:
        return _attention_call(mod, dt, d, hq, hkv, window, rope, cap, in_place)
    finally:
        os.environ.pop("MLX_LLAMA_ATTENTION_SPLIT_FROM", None)


def _attention_call(mod, dt, d, hq, hkv, window, rope, cap, in_place):
    q, new, cache = mx.zeros((1, hq, 1, d), dt), mx.zeros((1, hkv, 1, d), dt), mx.zeros((1, hkv, cap, d), dt)
    if rope is not None:  # model.RoPE.kernel_form(): (traditional, dims, scale, base, freqs or None)
        rope = (rope, d, 1.0, 10000.0, mx.ones((d // 2,), mx.float32) if rope else None)
    return mod.decode_attention(q, new, new, mx.concatenate([cache, cache], axis=1), mx.array(300, mx.int32), d ** -0.5, heads=hq,
                                window=window, rope=rope, in_place=in_place)


def _decode(tmp: Path, label: str, ttype: str, kw: dict, dt):
    """A tiny model's prompt (13 tokens) and 3 decoded tokens, the step compiled and op by op."""
    from make_fixture import make_tiny, make_tiny_vocab

    import mlx_llama
    from mlx_llama import decode_step
    from mlx_llama.generation import prefill

    vocab, path = tmp / "vocab.gguf", tmp / f"{label}-{ttype if isinstance(ttype, str) else 'mixed'}.gguf"  # no download
    if not path.exists():
        make_tiny(path, tensor_type=ttype, embed_std=0.5, vocab_from=vocab if vocab.exists() else make_tiny_vocab(vocab),
                  **kw)
    model, out = mlx_llama.load(path, dtype=dt, cpu_dequantize=False)[0], []
    for compiled in (True, False):
        cache = model.make_cache()
        y = mx.argmax(prefill(model, mx.array(list(range(3, 94, 7)), mx.int32), cache), -1).astype(mx.int32)
        step = decode_step.decoder(model, cache, compiled=compiled)
        for _ in range(3):
            out.append(step(y))
            y = mx.argmax(out[-1], -1).astype(mx.int32)
    return out


def _decode_with(pieces: str, *args):
    """`_decode` with MLX_LLAMA_CUDA_FUSE set to `pieces`."""
    before = os.environ.get("MLX_LLAMA_CUDA_FUSE")
    os.environ["MLX_LLAMA_CUDA_FUSE"] = pieces
    try:
        return _decode(*args)
    finally:
        if before is None:
            del os.environ["MLX_LLAMA_CUDA_FUSE"]
        else:
            os.environ["MLX_LLAMA_CUDA_FUSE"] = before


def drivers(mods: dict, tmp: Path) -> list[tuple[str, object, tuple, dict]]:
    """(label, function, args, kwargs) of each call that runs kernels. A module none of them calls is
    still covered where the model path uses it (the run names the modules whose kernels never ran)."""
    from mlx_llama import quants

    aff, blk, att, nrm, mma = (mods.get(f"cuda_{n}") for n in ("affine", "kernels", "attention", "norm", "mma"))
    calls = []

    def add(label, fn, *args, **kw):
        calls.append((label, fn, args, kw))

    for name, dt in ((n, getattr(mx, n)) for n in DTYPES):
        for kw in ({"bits": 2}, {"bits": 3}, {}, {"bits": 5}, {"bits": 6}, {"bits": 8}, {"nt": 3}, {"nt": 8},
                   {"symmetric": True}, {"act": 1}, {"act": 2}, {"epilogue": 1}, {"epilogue": 2}, {"nt": 3, "epilogue": 1},
                   ) if aff else ():
            add(f"cuda_affine.matvec {kw} {name}", _affine, aff.matvec, dt, **{"bits": 4, **kw})
        for kw in ({}, {"nt": 3}, {"symmetric": True}) if aff else ():
            add(f"cuda_affine.matvec_add_norm {kw} {name}", _affine_norm, aff.matvec_add_norm, dt, **kw)
        for rows, k, kw in ((70, 1024, {}), (256, 4096, {"symmetric": True}), (16, 384, {"act": 1}),
                            (70, 1024, {"act": 2})) if mma and name == "float16" else ():  # float16 only
            add(f"cuda_mma.matvec rows={rows} k={k} {kw} {name}", _affine, mma.matvec, dt, 4, 1, rows, k, **kw)
        for nt in (1, 3) if blk and name != "bfloat16" else ():
            add(f"cuda_kernels.block_matvec_add_norm nt={nt} {name}", _q6_k_norm, blk, dt, nt)
        for t, nt, kw in [(t, nt, {}) for t in (quants.Q6_K, quants.Q2_K) for nt in (0, 1, 3, 8)] + [
                (quants.Q6_K, 1, {"act": 1}), (quants.Q6_K, 1, {"act": 2})] if blk else ():
            add(f"cuda_kernels type={t} nt={nt} {kw} {name}", _blocks, blk, dt, t, nt, **kw)
        for c in ((128, 32, 32, 0), (64, 9, 3, 0), (128, 8, 2, 5), (256, 4, 2, 0), (64, 6, 6, 400),
                  (128, 8, 2, 0, True), (64, 8, 2, 0, False), (128, 8, 2, 0, False, 768, True),
                  (128, 8, 2, 0, False, 2000, True, True), (64, 6, 6, 400, None, 2000, False, True)) if att else ():
            add(f"cuda_attention.decode_attention {c} {name}", _attention, att, dt, *c)
        for shape in ((1, 1, 64), (3, 2048)) if nrm else ():
            add(f"cuda_norm.add_rms_norm {shape} {name}", nrm.add_rms_norm, *[mx.zeros(shape, dt)] * 2,
                mx.zeros(shape[-1:], dt), 1e-5)
        for label, ttype, kw in MODELS:
            add(f"model {label} {ttype} {name}", _decode, tmp, label, ttype, kw, dt)
        add(f"model llama Q4_0 {name}, the tail and embed pieces", _decode_with, "sym,norm,rope,act,inplace,tail,embed", tmp,
            "llama", "Q4_0", {}, dt)  # opt-in pieces
    return calls


def capture() -> tuple[Recorder, list[str]]:
    """Every kernel instantiation the drivers reach, and warnings: drivers that failed, modules with
    kernels that never ran."""
    global mx
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    importlib.import_module("mlx_llama")  # its BLAS goes in before mlx.core
    mx = importlib.import_module("mlx.core")
    rec, warnings, mods = Recorder(), [], {}
    mx.fast.cuda_kernel = rec.cuda_kernel
    for p in sorted((ROOT / "mlx_llama").glob("cuda_*.py")):
        mods[p.stem] = importlib.import_module(f"mlx_llama.{p.stem}")
        if hasattr(mods[p.stem], "available"):
            mods[p.stem].available = lambda: True
    with tempfile.TemporaryDirectory() as tmp:
        for label, fn, args, kw in drivers(mods, Path(tmp)):
            rec.origin = label
            try:
                mx.eval(fn(*args, **kw))
            except Exception as e:  # noqa: BLE001 - a driver out of date, or the package broken on this path
                warnings.append(f"WARNING driver failed: {label}: {type(e).__name__}: {str(e).strip()[:300]}")
    for stem in mods:
        makes = re.search(r'kernel\(f?"mlx_llama_', (ROOT / "mlx_llama" / f"{stem}.py").read_text())
        if makes and f"mlx_llama.{stem}" not in rec.modules:
            warnings.append(f"WARNING no kernel of mlx_llama/{stem}.py ran: give it a driver in this script")
    return rec, warnings


# -- compiling and reporting --------------------------------------------------------------------

def compile_all(launches: list[Launch], nvrtc: Nvrtc, headers: dict, options: list[str],
                jobs: int) -> list[tuple[bool, str]]:
    """(ok, log) per launch. Batches: the launches of one header, no kernel name twice, compiled as one
    program; then each launch of a failed batch alone, as MLX compiles it (with NVRTC's precompiled
    header of the includes: the same result, faster)."""
    groups: list[list[Launch]] = []
    size = max(1, min(40, -(-len(launches) // (2 * jobs))))
    for x in launches:
        b = next((b for b in groups if b[0].header == x.header and len(b) < size
                  and all(y.kernel_name() != x.kernel_name() for y in b)), None)
        groups.append([x]) if b is None else b.append(x)
    results: dict[int, tuple[bool, str]] = {}
    mp = multiprocessing.get_context("spawn")  # NVRTC runs one compilation at a time per process
    with tempfile.TemporaryDirectory() as pch, ProcessPoolExecutor(jobs, mp, _init, (str(nvrtc.path), headers)) as pool:
        futures = [pool.submit(_job, PREAMBLE + b[0].header + "".join(x.body() for x in b), f"batch_{i}",
                               [f"mlx::core::cu::{x.kernel_name()}" for x in b], options) for i, b in enumerate(groups)]
        for b, f in zip(groups, futures):
            ok, log = f.result()
            results.update({id(x): (True, log) for x in b} if ok else {})
        alone = [x for x in launches if id(x) not in results]
        futures = [pool.submit(_job, x.build(), x.kernel_name(), [f"mlx::core::cu::{x.kernel_name()}"],
                               [*options, "--pch", f"--pch-dir={pch}", "--pch-messages=false"]) for x in alone]
        results.update({id(x): f.result() for x, f in zip(alone, futures)})
    return [results[id(x)] for x in launches]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="only", default="", help="only the kernels whose name contains this")
    ap.add_argument("--arch", default="sm_90a", help="NVRTC's --gpu-architecture (MLX: sm_<cc>, 'a' from cc 9 on)")
    ap.add_argument("--mlx-cuda", help="an MLX CUDA build: its package folder (lib/libmlx.so, include/) or wheel")
    ap.add_argument("--dump", type=Path, help="write each instantiation's source into this folder")
    ap.add_argument("--self-test", action="store_true", help="add a copy of one kernel with a planted syntax error")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="NVRTC processes")
    ap.add_argument("-v", "--verbose", action="store_true", help="show NVRTC's warnings too")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    found = find_nvrtc()
    mlx = found and mlx_headers(args.mlx_cuda, found[1])
    if not mlx:
        print(INSTALL if found is None else NO_MLX)
        return 2
    nvrtc, (headers, include, origin) = Nvrtc(found[0]), mlx
    options = ["--device-as-default-execution-space", f"--gpu-architecture={args.arch}",
               *(f"--include-path={p}" for p in include)]
    print(f"NVRTC {nvrtc.version}: {nvrtc.path}\nMLX device headers: {origin}\noptions: {' '.join(options)}", flush=True)
    start = time.time()
    rec, warnings = capture()
    launches = sorted((x for x in rec.launches.values() if args.only in x.name), key=lambda x: (x.name, x.summary()))
    print(f"captured {len(launches)} instantiations of {len({x.name for x in launches})} kernels "
          f"({rec.count} launches, {time.time() - start:.1f} s)", *warnings, sep="\n", flush=True)
    if args.self_test and launches:
        planted = "    int planted = ;  // --self-test\n" + launches[0].source
        launches.insert(1, dataclasses.replace(launches[0], source=planted, origin="--self-test"))
    for x in launches if args.dump else ():
        args.dump.mkdir(parents=True, exist_ok=True)
        (args.dump / f"{x.kernel_name()}_{hashlib.sha1(x.build().encode()).hexdigest()[:8]}.cu").write_text(x.build())
    start = time.time()
    results = compile_all(launches, nvrtc, headers, options, max(1, args.jobs))
    for x, (ok, log) in zip(launches, results):
        print(f"{'ok' if ok else 'ERROR':6} {x.name:30} {x.summary()}")
        if not ok or (args.verbose and log):
            print("\n".join("       " + line for line in [*log.splitlines(), f"(first launched by: {x.origin})"]))
    failed = [x for x, (ok, _) in zip(launches, results) if not ok]
    print(f"{len(launches) - len(failed)} of {len(launches)} instantiations compiled, {len(failed)} failed "
          f"({time.time() - start:.1f} s, {args.jobs} NVRTC processes)")
    if args.self_test:
        caught = [x.origin for x in failed] == ["--self-test"]
        print("self-test:", "the planted error, and only it, was reported" if caught else "FAILED")
        return 0 if caught else 1
    return 1 if failed or not launches else 0


if __name__ == "__main__":
    sys.exit(main())
