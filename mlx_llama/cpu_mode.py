"""The CPU-mode rule: on MLX's CPU device, quantized weights are expanded to float32 at load
(every matmul then goes through BLAS, much faster than MLX's CPU quantized kernels) when the
float32 model needs at most `CPU_DEQUANTIZE_MEMORY_SHARE` of the machine's physical memory.
Used by every loader: GGUF files (`loader`), model directories (`convert.mlx_dir`), a rank's
share (`distributed.load`)."""

from __future__ import annotations

import os

import mlx.core as mx

CPU_DEQUANTIZE_MEMORY_SHARE = 0.5


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_cpu_dequantize(n_params: int) -> bool:
    """Auto rule: dequantize on the CPU device when float32 weights fit in half of physical memory."""
    if mx.default_device() != mx.cpu:
        return False
    return n_params * 4 <= CPU_DEQUANTIZE_MEMORY_SHARE * physical_memory()
