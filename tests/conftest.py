"""Shared pytest fixtures.

* ``smollm2_path``  (session): Path of the SmolLM2-135M-Instruct Q4_1 GGUF, the default model
  (``mlx_llama.default_model()``: downloaded once into the user's cache); skips only offline.
* ``smollm2`` (module): its ``(model, tokenizer)`` in the CPU mode; ``smol_gguf``: the open
  file; ``smol_tokenizer``: its tokenizer alone.
* ``tiny_gguf``     (session): factory ``tiny_gguf(tensor_type="F32", **kw) -> Path``
  writing a random tiny GGUF with ``scripts/make_fixture.make_tiny`` (same keyword arguments,
  ``arch="llama"`` by default); cached per argument set.
* ``reference``     (module): factory ``reference(path) -> ReferenceModel``
  (``tests/reference.py``), the two most recent cached per resolved path.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
for _p in (_TESTS, _ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The suite runs in two processes (pytest-xdist, pyproject's addopts) on a 2-core machine: one
# OpenBLAS thread each, and in the programs the tests start, or their BLAS threads spin against
# each other's (the suite took 600 s with OpenBLAS's default, 491 s so). A test that needs the
# worker threads (test_exit) asks for them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import mlx_llama  # noqa: E402,F401  (before mlx.core: the fast BLAS)
import mlx.core as mx  # noqa: E402
from make_fixture import make_tiny  # noqa: E402
from reference import ReferenceModel  # noqa: E402

# Hundreds of model loads run in this one process. MLX keeps freed buffers for reuse, and glibc
# keeps freed heap memory for reuse; both would hold gigabytes no test needs any more. Large
# blocks (the decoders' numpy temporaries) are mapped on their own, so freeing returns them.
mx.set_cache_limit(256 << 20)
try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
except (OSError, AttributeError):  # not glibc
    pass


def _freeze(v):
    """Hashable, order-independent key for fixture arguments (dicts, lists, paths)."""
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Path):
        return str(v.resolve())
    return (type(v).__name__, repr(v))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from mlx_llama import MlxLlamaError, default_model

    try:
        return Path(default_model())
    except MlxLlamaError as e:
        pytest.skip(f"needs the default model: {e}")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(model, tokenizer) of the SmolLM2 file, in the CPU mode: float32, weights expanded.
    Per module (~1 s to load), so the modules' models are not all held at once."""
    import mlx.core as mx

    import mlx_llama

    return mlx_llama.load(smollm2_path, dtype=mx.float32, cpu_dequantize=True)


@pytest.fixture(scope="session")
def smol_gguf(smollm2_path):
    """The SmolLM2 file, open (metadata and tensor table read once)."""
    from mlx_llama.gguf_file import GGUFFile

    return GGUFFile(smollm2_path)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_gguf):
    """mlx_llama's tokenizer of the SmolLM2 file."""
    from mlx_llama.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smol_gguf)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    made: dict = {}
    root = tmp_path_factory.mktemp("tiny_gguf")

    sig = inspect.signature(make_tiny)

    def factory(tensor_type="F32", **kw) -> Path:
        bound = sig.bind(None, tensor_type=tensor_type, **kw)
        bound.apply_defaults()  # tiny_gguf("F32") and tiny_gguf("F32", n_layers=2) share a file
        args = dict(bound.arguments)
        args.pop("path")
        key = _freeze(args)
        if key not in made:
            made[key] = make_tiny(root / f"tiny_{len(made)}.gguf", tensor_type=tensor_type, **kw)
        return made[key]

    return factory


@pytest.fixture(scope="module")
def reference():
    models: dict = {}  # the two most recently used: SmolLM2's oracle alone is 0.5 GB

    def factory(path) -> ReferenceModel:
        key = str(Path(path).resolve())
        model = models.pop(key, None) or ReferenceModel(key)
        models[key] = model
        while len(models) > 2:
            models.pop(next(iter(models)))
        return model

    return factory
