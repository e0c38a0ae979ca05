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
        kind, _, _, _, off, size = struct.unpack_from("<IIQQQQ", lib, shoff + i * shentsize)[1:7]
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


def mlx_cuda_root(arg: str | None) -> Path | None:
    """An MLX CUDA package folder (lib/libmlx.so, include/): --mlx-cuda, the installed MLX, or the
    GPU kit or a wheel unpacked into the cache."""
    cands = [Path(arg)] if arg else [Path(p) for p in importlib.import_module("mlx").__path__]
    for c in cands:
        for root in (c, c / "mlx"):
            lib = root / "lib/libmlx.so"
            if lib.exists() and (arg or DEVICE.encode() + b"utils.cuh\0" in lib.read_bytes()):
                return root
    archive = [Path(arg)] if arg and arg.endswith(".whl") else sorted(ROOT.glob(".gpu*/mlxcuda.part.*"), key=lambda p: p.name)
    if arg and not arg.endswith(".whl") or not archive:
        return None
    key = hashlib.sha1(repr([(p.name, p.stat().st_size) for p in archive]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_llama/nvrtc" / key
    if not (cache / ".complete").exists():
        print(f"unpacking MLX's CUDA headers from {', '.join(map(str, archive))} into {cache}", flush=True)
        members = _wheel_members(archive[0]) if arg else _tar_members(archive)
        for name, read in members:
            if name == "mlx/lib/libmlx.so":
                for inc, text in jit_sources(read()).items():
                    (cache / "jit" / inc).parent.mkdir(parents=True, exist_ok=True)
                    (cache / "jit" / inc).write_bytes(text)
            elif name.startswith("mlx/include/"):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                (cache / name).write_bytes(read())
        (cache / ".complete").touch()
    return cache / "mlx"


def _tar_members(parts):
    with tarfile.open(fileobj=lzma.LZMAFile(io.BytesIO(b"".join(p.read_bytes() for p in parts))), mode="r|") as tar:
        for m in tar:
            if m.isfile():
                yield m.name.removeprefix("./"), tar.extractfile(m).read


def _wheel_members(path):
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            yield name, lambda name=name: z.read(name)


def mlx_headers(arg: str | None, cuda_include: Path) -> Headers:
    root = mlx_cuda_root(arg)
    if root is not None:
        jit_dir = root.parent / "jit"
        jit = ({str(p.relative_to(jit_dir)): p.read_bytes() for p in jit_dir.rglob("*") if p.is_file()}
               if jit_dir.is_dir() else jit_sources((root / "lib/libmlx.so").read_bytes()))
        if jit:
            include = [str(root / "include"), str(root / "include/cccl")]
            return Headers(jit, [*include, str(cuda_include)], f"MLX CUDA build at {root}")
    cccl = [str(p) for p in (cuda_include / "cccl",) if p.is_dir()]
    return Headers({DEVICE + k: v.encode() for k, v in STUB.items()}, [*cccl, str(cuda_include)],
                   "STUB of utils.cuh (no MLX CUDA build found: pass --mlx-cuda): approximate")
