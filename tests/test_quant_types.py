"""SmolLM2 re-quantized by llama.cpp into each GGUF type, loaded by mlx_llama, against an exact reference.

Each file is made once per session from the default model (SmolLM2 Q4_1) with llama.cpp's
`llama_model_quantize` (skipped when llama_cpp is missing). SmolLM2's rows are 576 wide, not a
multiple of 256, so llama.cpp falls back to legacy types for every tensor but `ffn_down` in the
K-quant files (and keeps token_embd, the tied output, at Q8_0 or more); the tests assert which
types each file really holds:

    Q5_0    Q5_0, Q8_0                     Q4_K_M  Q5_0, Q4_K, Q6_K, Q8_0
    Q5_1    Q5_1, Q8_0                     Q5_K_M  Q5_1, Q5_K, Q6_K, Q8_0
    Q2_K    Q4_0, Q3_K, Q2_K (*), Q8_0     Q6_K    Q8_0, Q6_K
    Q3_K_M  Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q8_0
    IQ4_XS  IQ4_XS, IQ4_NL (attn_k, attn_v), Q5_K, Q4_0 (**), Q8_0

(*) llama.cpp's Q2_K mix gives this model no Q2_K tensor (ffn_down gets Q3_K), so even layers'
ffn_down are forced to Q2_K with a tensor-type override.
(**) llama.cpp's IQ4 search is slow (~15 s for the whole model on this 2-core machine), so the
IQ4_XS file keeps ffn_gate, ffn_up, attn_q and attn_output at Q4_0 (tensor-type overrides), which
cuts that to a third. It also stands for IQ4_NL: llama.cpp falls back to IQ4_NL for attn_k and
attn_v, whose 576-wide rows IQ4_XS cannot hold.

Tolerances (max |Δlogit| against the exact reference; the top-1 token must agree except where
the reference's top-2 gap is < 1e-2):

    mode         file holds                        bound   measured here
    dequantized  any                               1e-6    0 (the very same graph and weights)
    quantized    only types exact in MLX           1e-3    ≤ 2e-4 (MLX's kernels sum in another order)
                 (Q2_K/Q6_K as the file's blocks among them)
    quantized    Q4_K / Q5_K / IQ4_XS              0.25    ≤ 0.11

In the compact (quantized) form, Q2_K/Q6_K stay the file's blocks, dequantized to gguf's values
each time they are used (exact, as in the dequantized mode). Q4_K/Q5_K/IQ4_XS keep their scale
d·sc (and Q4_K/Q5_K their bias −dmin·m) rounded to float16 in the quantized form: ≤ 2⁻¹¹ of a
group's range per weight, the same for the 32 weights of a group, so the errors add up more
coherently than independent rounding (rounding every weight of the model to float16 moves these
logits by 0.02–0.04). Both bounds are far below llama.cpp's own CPU noise on this model (~1.3,
README).

The reference is the same Llama graph in float32 with every weight from `gguf.quants.dequantize`
(the graph itself is checked against the float64 oracle in test_model.py), so any difference
comes from the weights' MLX form. Models load with `load_model` on the file the reference
read (`mlx_llama.load` is that plus the tokenizer). Both CPU modes are checked:
`cpu_dequantize=True` (fast, the decoders' values expanded to float32) over 16 tokens, and the
quantized form, whose MLX CPU kernels are slow, over 4.
"""

from __future__ import annotations

import collections

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from make_quant_fixtures import requantize
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.architectures import read_config, tensor_shapes
from mlx_llama.loader import load_model
from mlx_llama.model import Model, module_path
from mlx_llama.quants import FORMATS, type_name

TEXT_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 9842, 2402, 253, 655, 28, 281]
N_QUANTIZED = 4  # tokens for the quantized (slow-kernel) mode

# file kind → (llama.cpp ftype, tensor-type overrides, the GGUF types the file must hold)
KINDS = {
    "Q5_0": ("Q5_0", {}, {"Q5_0", "Q8_0"}),
    "Q5_1": ("Q5_1", {}, {"Q5_1", "Q8_0"}),
    "Q2_K": ("Q2_K", {r"blk\.[0-9]*[02468]\.ffn_down": "Q2_K"}, {"Q4_0", "Q3_K", "Q2_K", "Q8_0"}),
    "Q3_K_M": ("Q3_K_M", {}, {"Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q8_0"}),
    "Q4_K_M": ("Q4_K_M", {}, {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}),
    "Q5_K_M": ("Q5_K_M", {}, {"Q5_1", "Q5_K", "Q6_K", "Q8_0"}),
    "Q6_K": ("Q6_K", {}, {"Q8_0", "Q6_K"}),
    "IQ4_XS": ("IQ4_XS", {r"ffn_(gate|up)|attn_(q|output)": "Q4_0"}, {"IQ4_NL", "IQ4_XS", "Q5_K", "Q4_0", "Q8_0"}),
}
# Exact in both modes (see mlx_llama/quants/__init__.py): affine with gguf's own float16 scales, or the
# file's blocks (Q2_K, Q6_K).
EXACT_KEPT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "IQ4_NL", "Q2_K", "Q6_K"}
# float16-rounded scales in the quantized form (exact, through float32 scales, when dequantized)
ROUNDED_SCALES = {"Q4_K", "Q5_K", "IQ4_XS"}


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
    """The float32 Llama graph with gguf.quants.dequantize weights."""

    def __init__(self, f: GGUFFile, ids=TEXT_IDS):
        cfg = read_config(f)
        weights = [(module_path(name), mx.array(gguf.quants.dequantize(f.tensors[name].data, f.tensors[name].ggml_type).reshape(shape)))
                   for name, shape in tensor_shapes(cfg).items()]
        model = Model(cfg, dtype=mx.float32, cpu_kernels=mx.default_device() == mx.cpu)
        model.load_weights(weights, strict=True)
        self.logits = np.array(model(mx.array([ids]))[0])


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request, requantized):
    """(kind, open file, reference); module-scoped, so pytest runs each file's tests together."""
    f = GGUFFile(requantized(request.param))
    held = {type_name(t.ggml_type) for t in f.tensors.values()} - {"F32"}
    assert held == KINDS[request.param][2], f"{request.param} holds {sorted(held)}"
    return request.param, f, Reference(f)


def check_logits(ours: np.ndarray, ref: Reference, bound: float) -> float:
    """Top-1 as the reference's except where its top-2 gap is < 1e-2; max |Δ| ≤ bound."""
    expected = ref.logits[: len(ours)]
    top2 = np.sort(expected, axis=-1)[:, -2:]
    close_call = top2[:, 1] - top2[:, 0] < 1e-2
    assert ((ours.argmax(-1) == expected.argmax(-1)) | close_call).all()
    err = float(np.abs(ours - expected).max())
    assert err <= bound, f"max |Δlogit| {err:.3g} > {bound:.3g}"
    return err


def check_mode(name: str, ref: Reference, ours: np.ndarray, quantized: bool) -> float:
    """The tolerance table of the module docstring."""
    held = KINDS[name][2]
    # Same weights: 0 in the dequantized mode (the reference's very graph); MLX's quantized
    # kernels sum in another order than BLAS (≤ 1e-3, as in test_model.py).
    same = 1e-3 if quantized else 1e-6
    if quantized and held & ROUNDED_SCALES:
        return check_logits(ours, ref, 0.25)
    return check_logits(ours, ref, same)


def test_dequantized_mode(kind):
    name, f, ref = kind
    model = load_model(f, cpu_dequantize=True, dtype=mx.float32)
    # Every type dequantizes to gguf's exact values (Q4_K, Q5_K, IQ4_XS through the float32
    # scales the decoders keep for this; Q2_K/Q6_K expanded straight to float32).
    err = check_mode(name, ref, np.array(model(mx.array([TEXT_IDS]))[0]), quantized=False)
    print(f"\n{name}: dequantized max |Δlogit| {err:.2e}")


def test_quantized_mode_and_memory(kind):
    name, f, ref = kind
    # = mlx_llama.load(path, cpu_dequantize=False, dtype=mx.float32) less the tokenizer, on the open file
    model = load_model(f, cpu_dequantize=False, dtype=mx.float32)
    err = check_mode(name, ref, np.array(model(mx.array([TEXT_IDS[:N_QUANTIZED]]))[0]), quantized=True)

    # Memory of the quantized form at dtype float16: dense weights (norms) are held in float16
    # there, quantized ones and Q2_K/Q6_K blocks exactly as here — so count this float32 model's
    # dense arrays at half their size.
    params = tree_flatten(model.parameters())
    mlx_bytes = sum(a.nbytes // 2 if a.dtype == mx.float32 else a.nbytes for _, a in params)
    by_type = collections.defaultdict(lambda: [0, 0.0])  # GGUF type → [file bytes, MLX bytes]
    for t in f.tensors.values():
        fmt = FORMATS[t.ggml_type]
        n = int(np.prod(t.shape))
        by_type[fmt.name][0] += t.data.nbytes
        by_type[fmt.name][1] += n * 2 if fmt.block_size == 1 else n * fmt.bits_per_weight / 8
    file_bytes = sum(b[0] for b in by_type.values())
    # The model holds what the table says each type takes (bits_per_weight; dense at float16).
    assert mlx_bytes == sum(b[1] for b in by_type.values())
    for t in ("Q5_0", "Q5_1", "Q4_K", "Q5_K"):  # the exact-affine types at their native size
        if t in by_type:
            assert by_type[t][1] <= 1.15 * by_type[t][0], t
    for t in ("Q2_K", "Q6_K"):  # the file's blocks: the file's bytes
        if t in by_type:
            assert by_type[t][1] == by_type[t][0], t
    ratios = ", ".join(f"{t} {m / b:.2f}×" for t, (b, m) in sorted(by_type.items()))
    print(f"\n{name}: quantized max |Δlogit| {err:.2e}; MLX float16 model {mlx_bytes / 2**20:.1f} MiB "
          f"= {mlx_bytes / file_bytes:.3f}× the file's {file_bytes / 2**20:.1f} MiB of tensors ({ratios})")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_block_embedding_and_output(tiny_gguf, tmp_path, tied):
    """Q6_K/Q2_K as the embedding table and the output projection (SmolLM2's 576-wide rows
    cannot hold them): a 256-wide tiny model quantized by llama.cpp, token_embd in Q6_K (looked
    up row by row, and the tied output), output in Q2_K when untied."""
    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) makes the quantized file")
    src = tiny_gguf("F32", hidden=256, ffn=512, n_heads=4, n_kv_heads=2, tied=tied)
    path = tmp_path / "tiny-k.gguf"
    requantize(str(src), str(path), {"token_embd": "Q6_K", "output": "Q2_K", "ffn_down": "Q2_K"}, ftype="Q6_K")
    f = GGUFFile(path)
    assert type_name(f.tensors["token_embd.weight"].ggml_type) == "Q6_K"
    assert type_name(f.tensors["blk.0.ffn_down.weight"].ggml_type) == "Q2_K"
    if not tied:
        assert type_name(f.tensors["output.weight"].ggml_type) == "Q2_K"
    ref = Reference(f)
    model = load_model(f, cpu_dequantize=False, dtype=mx.float32)
    assert type(model.token_embd).__name__ == "BlockEmbedding"
    assert type(model.blk[0].ffn.ffn_down).__name__ == "BlockLinear"
    ours = np.array(model(mx.array([TEXT_IDS]))[0])
    assert np.abs(ours - ref.logits).max() <= 1e-4
    # the rows a lookup dequantizes are the table's rows
    table = gguf.quants.dequantize(f.tensors["token_embd.weight"].data, f.tensors["token_embd.weight"].ggml_type)
    np.testing.assert_array_equal(np.array(model.token_embd(mx.array([[5, 7], [49151, 0]]))), table[[[5, 7], [49151, 0]]])


# --------------------------------------------------------------- one tiny llama.cpp-quantized fixture per type
TINY_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]
# llama.cpp's ftype for each (the overrides then put every weight matrix in the type itself)
TINY_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


@pytest.fixture(scope="module")
def tiny_float(tiny_gguf):
    # 256-wide rows, so every K-quant and IQ type holds every matrix; the embedding is tied
    return tiny_gguf("F32", hidden=256, ffn=512, n_heads=4, n_kv_heads=2, n_layers=2, seed=3)


@pytest.mark.parametrize("qtype", TINY_TYPES)
def test_tiny_fixture_per_type_vs_llama_cpp(tiny_float, tmp_path, qtype):
    """A tiny float model quantized by llama.cpp into `qtype` (every weight matrix, the embedding
    included), read by mlx_llama: its logits against llama.cpp's own on the same file (live
    goldens: the fixture itself needs llama.cpp's quantizer) and against the exact reference.

    Ours = the exact reference (gguf.quants.dequantize weights) to float32 rounding, in both CPU
    modes. llama.cpp quantizes the activations of quantized dot products to 8 bits, so against it
    the bound is statistical: max |Δlogit| ≤ 5% of the logits' range (measured: ≤ 1.4%; float16
    0.05%), and the top-1 token is llama.cpp's except where llama.cpp's own top-2 logits are within
    2× that max |Δ| (measured: 91–100% of the 32 positions agree)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) makes the fixtures and the goldens")
    path = tmp_path / f"tiny-{qtype}.gguf"
    requantize(str(tiny_float), str(path), {r"weight": qtype}, ftype=TINY_FTYPE.get(qtype, qtype))
    f = GGUFFile(path)
    held = {type_name(t.ggml_type) for name, t in f.tensors.items() if not name.endswith("norm.weight")}
    assert held == {qtype}, held
    ids = TEXT_IDS * 2
    ref = Reference(f, ids)
    expanded = np.array(load_model(f, cpu_dequantize=True, dtype=mx.float32)(mx.array([ids]))[0])
    compact = np.array(load_model(f, cpu_dequantize=False, dtype=mx.float32)(mx.array([ids[:4]]))[0])
    assert np.abs(expanded - ref.logits).max() <= 1e-4
    bound = 1e-3 if qtype in EXACT_KEPT | {"F16", "BF16"} else 0.25  # the compact form's table in the module doc
    assert np.abs(compact - ref.logits[:4]).max() <= bound

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    spread = float(theirs.max() - theirs.min())
    err = float(np.abs(expanded - theirs).max())
    same = expanded.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    print(f"\n{qtype}: vs llama.cpp max |Δ| {err:.3g} ({100 * err / spread:.2f}% of the range {spread:.2f}), top-1 {100 * same.mean():.0f}%")
    assert err <= 0.05 * spread
    assert (same | (top2[:, 1] - top2[:, 0] < 2 * err)).all()
