"""Put a fast BLAS under MLX on Linux.

MLX's Linux wheels link the reference (netlib) BLAS, whose sgemm runs at ~1.6 GFLOP/s on a
2-core machine. MLX calls `cblas_sgemm` & co. through the dynamic linker, so a library that
exports the standard `cblas_*` symbols and is loaded with RTLD_GLOBAL *before* `mlx.core`
takes those calls (OpenBLAS: ~210 GFLOP/s on the same machine). This must run before anything
imports `mlx.core`; `mlx_llama/__init__.py` calls it first thing.

A preloaded OpenBLAS is also why `finish_queued_work` runs at exit (see there).

MLX_LLAMA_BLAS=off turns it off; MLX_LLAMA_BLAS=/path/to/libfoo.so picks a library. When the
model then runs on the CPU without a fast BLAS, `warn_if_slow` says so once per process, with the
fix (MLX_LLAMA_BLAS_WARNING=off silences it, as does a `warnings` filter on SlowBLASWarning).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys
import warnings

from .errors import SlowBLASWarning

# Searched in order. Debian/Ubuntu: `apt install libopenblas0` (or libopenblas0-pthread).
# Intel MKL also works (`pip install mkl` puts libmkl_rt in <prefix>/lib), but weighs ~1 GB.
CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so", "libmkl_rt.so.3", "libmkl_rt.so.2")

OFF = ("0", "off", "no", "none", "false")
status = "not checked"  # one line for --verbose
fast = False  # whether a fast BLAS serves MLX's CPU matmuls
fix = ""  # how to get one, when not
_warned = False
_streams: list = []  # MLX streams other than the default ones, drained at exit and before a fork


def _has_cblas(lib: ctypes.CDLL) -> bool:
    try:
        lib.cblas_sgemm  # noqa: B018 - attribute lookup is the check
        return True
    except AttributeError:
        return False


def preload() -> str:
    """Load a fast BLAS globally if we can; return (and remember) a line saying what happened."""
    global status, fast, fix
    setting = os.environ.get("MLX_LLAMA_BLAS", "").strip()
    if sys.platform == "darwin":
        status, fast = "Accelerate (MLX's own on macOS)", True
    elif setting.lower() in OFF:
        status = "MLX's bundled reference BLAS (MLX_LLAMA_BLAS=off)"
        fix = "unset MLX_LLAMA_BLAS to preload OpenBLAS"
    elif "mlx.core" in sys.modules:
        status = "MLX's bundled reference BLAS (mlx.core was imported before mlx_llama)"
        fix = "import mlx_llama before mlx.core, so that it can preload OpenBLAS"
    else:
        prefix_lib = os.path.join(sys.prefix, "lib")
        names = (setting,) if setting else CANDIDATES + tuple(os.path.join(prefix_lib, n) for n in CANDIDATES[3:])
        for name in names:
            try:
                lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            if _has_cblas(lib):
                status, fast = f"{name} (preloaded)", True
                atexit.register(finish_queued_work)
                if hasattr(os, "register_at_fork"):
                    os.register_at_fork(before=finish_queued_work)
                break
        else:
            missing = f"could not load MLX_LLAMA_BLAS={setting}" if setting else "no OpenBLAS found"
            status = f"MLX's bundled reference BLAS (slow): {missing}"
            fix = ("point MLX_LLAMA_BLAS at a library exporting cblas_sgemm, or unset it" if setting
                   else "on Debian/Ubuntu run `sudo apt install libopenblas0`")
    return status


def drain_at_exit(stream) -> None:
    """Have `finish_queued_work` also wait for `stream` (a thread's own, e.g. the server's)."""
    _streams.append(stream)


def finish_queued_work() -> None:
    """At exit and before a fork, ahead of the native libraries' handlers for them: wait for the
    work MLX has queued.

    OpenBLAS's exit and fork handler (0.3.21, Debian 12's) stops its worker threads; when a
    matmul is still running on MLX's CPU thread, a worker can miss the stop and sleep forever,
    and the process hangs instead of exiting or forking (a 2048² matmul queued at exit: 12 hangs
    in 12 exits; at a fork: 3 in 4).
    A decode loop queues step n+1 before it hands out token n, so a program that stops reading
    tokens exits with one queued. The CLI's `cli.run` calls it too, then exits skipping those
    handlers."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return
    streams = [mx.default_stream(mx.cpu), *_streams]
    if mx.default_device() != mx.cpu:
        streams.append(mx.default_stream(mx.default_device()))
    for stream in streams:
        try:
            mx.synchronize(stream)
        except Exception:  # noqa: BLE001 - exiting anyway; nothing to report
            pass


def warn_if_slow() -> None:
    """Once per process: warn that CPU matmuls run on the reference BLAS, and how to fix it."""
    global _warned
    if fast or _warned or os.environ.get("MLX_LLAMA_BLAS_WARNING", "").strip().lower() in OFF:
        return
    _warned = True
    warnings.warn(
        f"the model runs on the CPU with {status}, ~100x slower than OpenBLAS; to fix: {fix} "
        "(MLX_LLAMA_BLAS_WARNING=off silences this)",
        SlowBLASWarning,
        stacklevel=3,
    )
