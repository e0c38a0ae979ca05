"""Compile every CUDA kernel of mlx_llama with NVRTC on this machine, as MLX's CUDA backend would.

The package's kernels are `mx.fast.cuda_kernel`s, which MLX compiles on the GPU host the first
time they run: a typo costs a round trip there. This script finds them here, on the CPU:

1. it replaces `mx.fast.cuda_kernel` with a recorder (outputs: zeros) and forces every
   `available()` of mlx_llama/cuda_*.py to True, then calls each module's kernel functions in
   float16, bfloat16 and float32 with the shapes of tests/test_cuda_kernels.py, and runs tiny
   models (scripts/make_fixture.py) through a prompt and decode steps, compiled and op by op, so
   the model path's template arguments are the real ones;
2. it writes each distinct instantiation's source as MLX 0.32.4 does
   (mlx/backend/cuda/custom_kernel.cpp): `#include "mlx/backend/cuda/device/utils.cuh"` and
   <cooperative_groups.h>, the header, then in `namespace mlx::core::cu` a
   `__global__ void custom_kernel_<name><template hash>(const T* in, [const __grid_constant__
   Shape in_shape, Strides in_strides, int in_ndim,] ..., T* out)` whose body starts with
   `constexpr int N = ...; constexpr bool B = ...; using T = ...;` for the template arguments;
3. it compiles it with NVRTC as jit_module.cpp does: MLX's device headers as in-memory headers,
   `--device-as-default-execution-space --gpu-architecture=sm_90a` (an H200: SASS) and the include
   paths of MLX's bundled headers, its CCCL and the CUDA runtime's headers, and prints per
   instantiation "ok" or NVRTC's log.

MLX's device headers are embedded in its CUDA library: they are read from --mlx-cuda (an MLX
CUDA package folder or wheel), the installed MLX where it is a CUDA build, or the GPU kit
(.gpu1/.gpu2/mlxcuda.part.*: unpacked once into ~/.cache/mlx_llama/nvrtc); with none of them a
stub of utils.cuh stands in (the run says so).

Run:  python scripts/check_nvrtc.py [-k NAME] [--dump DIR] [--self-test] [--arch sm_90a]
Needs NVRTC (not a project dependency); exit status 0: all compile, 1: some fail, 2: no NVRTC.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib
import inspect
import io
import lzma
import os
import struct
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ('NVRTC not found: pip install "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" '
           '"nvidia-cuda-cccl==13.0.*"')
DEVICE = "mlx/backend/cuda/device/"
PREAMBLE = f'\n#include "{DEVICE}utils.cuh"\n\n#include <cooperative_groups.h>\n\n'  # custom_kernel.cpp
# dtype → the CUDA type of a pointer or `using` (dtype_to_cuda_type), and its name in the kernel's name
CUDA_TYPE = {"bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
             "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
             "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
             "complex64": "mlx::core::cu::complex64_t"}
HASH_TYPE = {**{k: v for k, v in CUDA_TYPE.items() if k.startswith(("int", "uint", "bool"))},
             "float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "float64": "double",
             "complex64": "complex64_t"}
STUB = {  # the least of MLX's device headers that a custom kernel's preamble needs
    "config.h": "#pragma once\n#define MAX_NDIM 10\n#define WARP_SIZE 32\n",
    "complex.cuh": "#pragma once\n#include <cuda/std/complex>\n"
                   "namespace mlx::core::cu { using complex64_t = cuda::std::complex<float>; }\n",
    "utils.cuh": f'#pragma once\n#include "{DEVICE}complex.cuh"\n#include "{DEVICE}config.h"\n'
                 "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cuda/std/array>\n"
                 "#include <cuda/std/limits>\n#include <cuda/std/tuple>\nnamespace mlx::core::cu {\n"
                 "using Shape = cuda::std::array<int32_t, MAX_NDIM>;\n"
                 "using Strides = cuda::std::array<int64_t, MAX_NDIM>;\n}\n",
}


def dtype_name(d) -> str:
    return str(d).rsplit(".", 1)[-1]


# -- NVRTC ---------------------------------------------------------------------------------------

def site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


class Nvrtc:
    """libnvrtc through ctypes: `compile` gives (ok, log)."""

    def __init__(self, path: Path):
        self.path, lib = path, ctypes.CDLL(str(path))
        P, S, I, C = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p
        for fn, args in {"nvrtcCreateProgram": [ctypes.POINTER(P), C, C, I, ctypes.POINTER(C), ctypes.POINTER(C)],
                         "nvrtcAddNameExpression": [P, C], "nvrtcCompileProgram": [P, I, ctypes.POINTER(C)],
                         "nvrtcGetProgramLogSize": [P, ctypes.POINTER(S)], "nvrtcGetProgramLog": [P, C],
                         "nvrtcGetLoweredName": [P, C, ctypes.POINTER(C)], "nvrtcDestroyProgram": [ctypes.POINTER(P)],
                         "nvrtcVersion": [ctypes.POINTER(I), ctypes.POINTER(I)]}.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, I
        lib.nvrtcGetErrorString.restype, lib.nvrtcGetErrorString.argtypes = C, [I]
        major, minor = I(), I()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.lib, self.version = lib, f"{major.value}.{minor.value}"

    def compile(self, source: str, program: str, kernel: str, headers: dict[str, bytes],
                options: list[str]) -> tuple[bool, str]:
        lib, prog = self.lib, ctypes.c_void_p()
        names, texts = list(headers), list(headers.values())
        arr = lambda xs: (ctypes.c_char_p * max(1, len(xs)))(*xs)  # noqa: E731
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{program}.cu".encode(), len(texts),
                                    arr(texts), arr([n.encode() for n in names]))
        if rc:
            return False, f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}"
        try:
            lib.nvrtcAddNameExpression(prog, kernel.encode())
            rc = lib.nvrtcCompileProgram(prog, len(options), arr([o.encode() for o in options]))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace").strip()
            if rc:
                return False, text or lib.nvrtcGetErrorString(rc).decode()
            lowered = ctypes.c_char_p()
            rc = lib.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(lowered))
            if rc:  # MLX then fails too: the kernel function is not what the source defines
                return False, f"nvrtcGetLoweredName({kernel}): {lib.nvrtcGetErrorString(rc).decode()}"
            return True, text
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_nvrtc() -> tuple[Path, Path] | None:
    """libnvrtc and the CUDA runtime headers: the nvidia/cu13 wheels (where MLX looks), or CUDA_HOME."""
    for d in site_dirs():
        lib, inc = d / "nvidia/cu13/lib/libnvrtc.so.13", d / "nvidia/cu13/include"
        if lib.exists() and inc.is_dir():
            return lib, inc
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    libs = sorted(home.glob("lib64/libnvrtc.so*"))
    return (libs[0], home / "include") if libs and (home / "include").is_dir() else None


# -- MLX's device headers: the jit_source_* strings that libmlx.so embeds ------------------------

def jit_sources(lib: bytes) -> dict[str, bytes]:
    """{include name: text} from a CUDA build of libmlx.so: jit_module.cpp's arrays g_include_names
    and g_headers, pointers found through their R_X86_64_RELATIVE relocations."""
    shoff, = struct.unpack_from("<Q", lib, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", lib, 0x3A)
    phoff, = struct.unpack_from("<Q", lib, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", lib, 0x36)
    loads = [struct.unpack_from("<IIQQQQ", lib, phoff + i * phentsize) for i in range(phnum)]
    loads = [(off, va, size) for kind, _, off, va, _, size in loads if kind == 1]  # PT_LOAD
    relocs = {}
    for i in range(shnum):
        _, kind, _, _, off, size = struct.unpack_from("<IIQQQQ", lib, shoff + i * shentsize)
        if kind == 4:  # SHT_RELA
            for r_off, info, addend in struct.iter_unpack("<QQq", lib[off:off + size]):
                if info & 0xFFFFFFFF == 8:
                    relocs[r_off] = addend

    def string(va: int) -> bytes:
        off = next((va - v + o for o, v, n in loads if v <= va < v + n), None)
        return b"" if off is None else lib[off:lib.index(b"\0", off)]

    names = sorted(s for s, va in relocs.items() if string(va).startswith(DEVICE.encode()))
    start = next((s for s in names if s - 8 not in names), None)
    n = next((k for k in range(len(names) + 1) if start is None or start + 8 * k not in relocs
              or not string(relocs[start + 8 * k]).startswith(DEVICE.encode())), 0)
    for delta in sorted(range(-4096, 4096 + 1, 8), key=abs):  # g_headers: n pointers beside the names
        slots = [start + delta + 8 * i for i in range(n)] if start is not None else []
        if delta and all(s in relocs and s not in names for s in slots):
            texts = {string(relocs[start + 8 * i]).decode(): string(relocs[s]) for i, s in enumerate(slots)}
            if b"#pragma once" in texts.get(f"{DEVICE}utils.cuh", b""):
                return texts
    return {}


@dataclass
class Headers:
    jit: dict[str, bytes]
    include: list[str]  # MLX's --include-path list, the CUDA headers last
    origin: str


def mlx_cuda_build(arg: str | None) -> tuple[Path, dict[str, bytes]] | None:
    """An MLX CUDA build's package folder (lib/libmlx.so, include/) and its device headers:
    --mlx-cuda, the installed MLX, or the GPU kit (or a wheel) unpacked into the cache."""
    cands = [Path(arg)] if arg else [Path(p) for p in importlib.import_module("mlx").__path__]
    for c in cands:
        for root in (c, c / "mlx"):
            if (root / "lib/libmlx.so").exists():
                jit = jit_sources((root / "lib/libmlx.so").read_bytes())
                if jit:
                    return root, jit
    archive = [Path(arg)] if arg and arg.endswith(".whl") else sorted(ROOT.glob(".gpu*/mlxcuda.part.*"), key=lambda p: p.name)
    if (arg and not arg.endswith(".whl")) or not archive:
        return None
    key = hashlib.sha1(repr([(p.name, p.stat().st_size) for p in archive]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_llama/nvrtc" / key
    if not (cache / ".complete").exists():
        print(f"unpacking MLX's CUDA headers from {', '.join(map(str, archive))} into {cache}", flush=True)
        for name, read in (_wheel_members(archive[0]) if arg else _tar_members(archive)):
            if name == "mlx/lib/libmlx.so":
                for inc, text in jit_sources(read()).items():
                    (cache / "jit" / inc).parent.mkdir(parents=True, exist_ok=True)
                    (cache / "jit" / inc).write_bytes(text)
            elif name.startswith("mlx/include/"):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                (cache / name).write_bytes(read())
        (cache / ".complete").touch()
    jit = {str(p.relative_to(cache / "jit")): p.read_bytes() for p in (cache / "jit").rglob("*") if p.is_file()}
    return (cache / "mlx", jit) if jit else None


def _tar_members(parts):
    with tarfile.open(fileobj=lzma.LZMAFile(io.BytesIO(b"".join(p.read_bytes() for p in parts))), mode="r|") as tar:
        for m in tar:
            if m.isfile():
                yield m.name.removeprefix("./"), tar.extractfile(m).read


def _wheel_members(path):
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            yield name, lambda name=name: z.read(name)


@dataclass
class Headers:
    jit: dict[str, bytes]  # NVRTC's in-memory headers
    include: list[str]  # MLX's --include-path list: its bundled headers, its CCCL, the CUDA headers
    origin: str


def mlx_headers(arg: str | None, cuda_include: Path) -> Headers:
    build = mlx_cuda_build(arg)
    if build is not None:
        root, jit = build
        return Headers(jit, [str(root / "include"), str(root / "include/cccl"), str(cuda_include)],
                       f"MLX CUDA build at {root} ({len(jit)} device headers)")
    cccl = [str(cuda_include / "cccl")] if (cuda_include / "cccl").is_dir() else []
    return Headers({DEVICE + k: v.encode() for k, v in STUB.items()}, [*cccl, str(cuda_include)],
                   "a STUB of MLX's utils.cuh (no MLX CUDA build found; pass --mlx-cuda): approximate")


# -- the source MLX generates (custom_kernel.cpp: build_kernel, template_arguments_hash) --------

@dataclass
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
    seen: int = field(default=1, compare=False)

    def kernel_name(self) -> str:
        parts = [("_t" if v else "_f") if isinstance(v, bool) else f"_{HASH_TYPE[v[1]]}" if isinstance(v, tuple)
                 else f"_{v}" for _, v in self.template]
        return f"custom_kernel_{self.name}{''.join(parts)}"

    def build(self) -> str:
        src = [PREAMBLE, self.header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
               f"__global__ void {self.kernel_name()}(\n"]
        for n, (dt, ndim) in zip(self.input_names, self.inputs):
            src.append(f"    const {CUDA_TYPE[dt]}* {n},\n")
            for suffix, kind in (("_shape", "__grid_constant__ Shape"), ("_strides", "__grid_constant__ Strides"),
                                 ("_ndim", "__grid_constant__ int")):
                if ndim > 0 and n + suffix in self.source:
                    src.append(f"    const {kind} {n}{suffix},\n")
        src.append(",\n".join(f"    {CUDA_TYPE[dt]}* {n}" for n, dt in zip(self.output_names, self.outputs)) + ") {\n")
        for n, v in self.template:
            src.append(f"  constexpr bool {n} = {str(v).lower()};\n" if isinstance(v, bool) else
                       f"  using {n} = {CUDA_TYPE[v[1]]};\n" if isinstance(v, tuple) else f"  constexpr int {n} = {v};\n")
        src.append("\n" if self.template else "")
        return "".join(src) + self.source + "\n}\n\n} // namespace mlx::core::cu\n"

    def summary(self) -> str:
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
        args = " ".join(f"{n}={short.get(v[1], v[1]) if isinstance(v, tuple) else v}" for n, v in self.template)
        return f"{args} ({','.join(short.get(d, d) for d, _ in self.inputs)})"


# -- the recorder that stands in for mx.fast.cuda_kernel ----------------------------------------

class Recorder:
    def __init__(self):
        self.launches: dict[tuple[str, str], Launch] = {}
        self.origin = ""

    def cuda_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                    shared_memory=0):
        if not output_names:
            raise ValueError("[custom_kernel] Must specify at least one output.")
        spec = dict(name=name, input_names=list(input_names), output_names=list(output_names), source=source,
                    header=header)
        return lambda **kw: self.launch(spec, **kw)

    def launch(self, spec, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
               init_value=None, verbose=False, stream=None):
        import mlx.core as mx

        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        if not len(arrays) == len(spec["input_names"]) or not len(output_shapes) == len(output_dtypes) == len(spec["output_names"]):
            raise ValueError(f"[custom_kernel] {spec['name']}: inputs or outputs do not match their names")
        targs = []
        for n, v in template or []:
            if isinstance(v, mx.Dtype):
                v = ("dtype", dtype_name(v))
            elif not isinstance(v, (bool, int)) or not isinstance(v, bool) and not -2**31 <= v < 2**31:
                raise ValueError(f"[cuda_kernel] {spec['name']}: template argument {n}={v!r}: not a Dtype, int or bool")
            targs.append((n, v))
        launch = Launch(**spec, inputs=[(dtype_name(a.dtype), a.ndim) for a in arrays],
                        outputs=[dtype_name(d) for d in output_dtypes], template=targs, origin=self.origin)
        key = (launch.kernel_name(), launch.build())
        if key in self.launches:
            self.launches[key].seen += 1
        else:
            self.launches[key] = launch
        return [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]


# -- what runs the kernels: direct calls (the tests' shapes) and tiny models' decoding ----------

DTYPES = ("float16", "bfloat16", "float32")
MODELS = [("llama", "Q4_0", {}), ("llama", "Q4_1", {}), ("llama", "Q8_0", {}),  # SiLU; Q4_0/Q8_0 symmetric
          ("gemma3", "Q4_0", dict(arch="gemma3", n_layers=3, softcap=20.0)),  # GELU, sliding window
          ("qwen3", "Q8_0", dict(arch="qwen3", head_dim=32, n_kv_heads=1)),  # q/k norms, head size 32
          ("fused-qkv", "Q4_0", dict(fused_qkv=True, biases=("attn_qkv", "attn_output", "ffn_down")))]


def _affine(mod, dt, bits, nt=1, rows=70, k=1056, **kw):
    import mlx.core as mx

    wq, scales, biases = mx.quantize(mx.zeros((rows, k), dt), group_size=32, bits=bits)
    return mod.matvec(mx.zeros((nt, k * (2 if kw.get("act") else 1)), dt), wq, scales, biases, bits, **kw)


def _blocks(mod, dt, ggml_type, nt=0, **kw):  # nt 0: dequantize
    import mlx.core as mx
    import numpy as np

    from mlx_llama import quants

    rows, nb = 39, 6
    blocks = np.zeros((rows, nb, {quants.Q6_K: 210, quants.Q2_K: 84}[ggml_type]), np.uint8)
    fields = quants.split_blocks(ggml_type, blocks).fields
    if not nt:
        return mod.dequantize(ggml_type, fields, dt)
    return mod.block_matvec(mx.zeros((nt, nb * 256 * (2 if kw.get("act") else 1)), dt), ggml_type, fields, **kw)


def _attention(mod, dt, d, hq, hkv, window, rope=None, cap=768):
    import mlx.core as mx

    q, new, cache = mx.zeros((1, hq, 1, d), dt), mx.zeros((1, hkv, 1, d), dt), mx.zeros((1, hkv, cap, d), dt)
    rope = None if rope is None else (rope, d, 1.0, mx.zeros((d // 2,), mx.float32))
    return mod.decode_attention(q, new, new, cache, cache, mx.array(300, mx.int32), d ** -0.5, heads=hq,
                                window=window, rope=rope)


def _decode(path, dt):
    """A tiny model's prompt (13 tokens) and 3 decoded tokens, the step compiled and op by op."""
    import mlx.core as mx

    import mlx_llama
    from mlx_llama import decode_step
    from mlx_llama.generation import prefill

    model, _ = mlx_llama.load(path, dtype=dt, cpu_dequantize=False)
    out = []
    for compiled in (True, False):
        cache = model.make_cache()
        y = mx.argmax(prefill(model, mx.array(list(range(3, 94, 7)), mx.int32), cache), -1).astype(mx.int32)
        step = decode_step.decoder(model, cache, compiled=compiled)
        for _ in range(3):
            out.append(step(y))
            y = mx.argmax(out[-1], -1).astype(mx.int32)
    return out


def drivers(mods: dict, tmp: Path) -> list:
    """(label, function) for every call that runs kernels; a module without a function here is
    still covered where the model path uses it."""
    import mlx.core as mx

    from make_fixture import make_tiny
    from mlx_llama import quants

    aff, blk, att, nrm = (mods.get(f"cuda_{n}") for n in ("affine", "kernels", "attention", "norm"))
    calls = []
    for name in DTYPES:
        dt = getattr(mx, name)
        if aff:
            calls += [(f"cuda_affine.matvec bits={b} {name}", (_affine, aff, dt, b)) for b in (2, 3, 4, 5, 6, 8)]
            calls += [(f"cuda_affine.matvec nt={nt} {name}", (_affine, aff, dt, 4, nt)) for nt in (3, 8)]
            calls += [(f"cuda_affine.matvec {kw} {name}", (_affine, aff, dt, 4, 1, 70, 1056, kw))
                      for kw in ({"symmetric": True}, {"act": 1}, {"act": 2})]
        if blk:
            for t in (quants.Q6_K, quants.Q2_K):
                calls += [(f"cuda_kernels type={t} nt={nt} {name}", (_blocks, blk, dt, t, nt)) for nt in (0, 1, 3, 8)]
            calls += [(f"cuda_kernels.block_matvec Q6_K act={a} {name}", (_blocks, blk, dt, quants.Q6_K, 1, {"act": a}))
                      for a in (1, 2)]
        if att:
            calls += [(f"cuda_attention d={c[0]} hq={c[1]} hkv={c[2]} window={c[3]} {name}", (_attention, att, dt, *c))
                      for c in ((128, 32, 32, 0), (64, 9, 3, 0), (128, 8, 2, 5), (256, 4, 2, 0), (64, 6, 6, 400),
                                (128, 8, 2, 0, True), (64, 8, 2, 0, False))]
        if nrm:
            calls += [(f"cuda_norm.add_rms_norm {shape} {name}", (nrm.add_rms_norm, *(mx.zeros(shape, dt),) * 2,
                                                                  mx.zeros(shape[-1:], dt), 1e-5))
                      for shape in ((1, 1, 64), (3, 2048))]
    for label, ttype, kw in MODELS:
        path = make_tiny(tmp / f"{label}-{ttype}.gguf", tensor_type=ttype, embed_std=0.5, **kw)
        calls += [(f"model {label} {ttype} {name}", (_decode, path, getattr(mx, name))) for name in DTYPES]
    return calls


def capture() -> tuple[Recorder, list[str]]:
    """Every kernel instantiation the drivers reach, and the drivers that failed."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import mlx_llama  # noqa: F401  (its BLAS goes in before mlx.core)
    import mlx.core as mx

    rec, failures, mods = Recorder(), [], {}
    mx.fast.cuda_kernel = rec.cuda_kernel
    for p in sorted((ROOT / "mlx_llama").glob("cuda_*.py")):
        mods[p.stem] = importlib.import_module(f"mlx_llama.{p.stem}")
        if hasattr(mods[p.stem], "available"):
            mods[p.stem].available = lambda: True
    with tempfile.TemporaryDirectory() as tmp:
        for label, (fn, *args) in drivers(mods, Path(tmp)):
            kw = args.pop() if args and isinstance(args[-1], dict) else {}
            rec.origin = label
            try:
                mx.eval(fn(*args, **kw))
            except Exception as e:  # a driver out of date, or the package broken on this path
                failures.append(f"{label}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    return rec, failures


# -- compiling and reporting --------------------------------------------------------------------

def compile_launch(nvrtc: Nvrtc, headers: Headers, options: list[str], launch: Launch, source: str | None = None):
    name = launch.kernel_name()
    return nvrtc.compile(source or launch.build(), name, f"mlx::core::cu::{name}", headers.jit, options)


def self_test(nvrtc, headers, options, launches: list[Launch]) -> int:
    """One instantiation as captured, then a copy with a syntax error planted in its body."""
    launch = launches[0]
    broken = launch.build().replace(launch.source, "    int planted = ;  // planted by --self-test\n" + launch.source)
    results = [compile_launch(nvrtc, headers, options, launch, src) for src in (None, broken)]
    for what, (ok, log) in zip(("as captured", "with a planted syntax error"), results):
        print(f"{'ok' if ok else 'ERROR':6} {launch.name} {what}" + ("" if ok else "\n" + log))
    caught = results[0][0] and not results[1][0] and "planted" in results[1][1]
    print("self-test:", "the planted error was reported" if caught else "FAILED")
    return 0 if caught else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="only", default="", help="only the kernels whose name contains this")
    ap.add_argument("--arch", default="sm_90a", help="NVRTC's --gpu-architecture (MLX: sm_<cc>[a from 9.0 on])")
    ap.add_argument("--mlx-cuda", help="an MLX CUDA build: its package folder (lib/libmlx.so, include/) or wheel")
    ap.add_argument("--dump", type=Path, help="write each generated source into this folder")
    ap.add_argument("--self-test", action="store_true", help="check that a planted syntax error is reported")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compilations at once")
    ap.add_argument("-v", "--verbose", action="store_true", help="show NVRTC's warnings too")
    args = ap.parse_args(argv)
    found = find_nvrtc()
    if found is None:
        print(INSTALL)
        return 2
    nvrtc, headers = Nvrtc(found[0]), mlx_headers(args.mlx_cuda, found[1])
    options = ["--device-as-default-execution-space", f"--gpu-architecture={args.arch}",
               *(f"--include-path={p}" for p in headers.include)]
    print(f"NVRTC {nvrtc.version}: {nvrtc.path}\nMLX device headers: {headers.origin}\noptions: {' '.join(options)}")
    start = time.time()
    rec, failures = capture()
    launches = sorted((x for x in rec.launches.values() if args.only in x.name), key=lambda x: (x.name, x.summary()))
    print(f"{len(launches)} instantiations of {len({x.name for x in launches})} kernels from "
          f"{sum(x.seen for x in launches)} launches ({time.time() - start:.1f} s)")
    for f in failures:
        print(f"driver failed (fix the package or this script's driver): {f}")
    if args.self_test:
        return self_test(nvrtc, headers, options, launches)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for x in launches:
            src = x.build()
            (args.dump / f"{x.kernel_name()}_{hashlib.sha1(src.encode()).hexdigest()[:8]}.cu").write_text(src)
    start = time.time()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda x: compile_launch(nvrtc, headers, options, x), launches))
    bad = 0
    for x, (ok, log) in zip(launches, results):
        bad += not ok
        print(f"{'ok' if ok else 'ERROR':6} {x.name:32} {x.summary()}")
        if not ok or (args.verbose and log):
            print("\n".join("       " + line for line in [*log.splitlines(), f"(first from: {x.origin})"]))
    print(f"{len(launches) - bad} of {len(launches)} compiled, {bad} failed ({time.time() - start:.1f} s, "
          f"{args.jobs} at once)")
    return 1 if bad or not launches else 0


if __name__ == "__main__":
    sys.exit(main())
