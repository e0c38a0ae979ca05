"""NaN and infinity: in a weight or a block scale, one `GGUFError` line naming the tensor at load
(no numpy warnings); in the logits, generation stops with one error line instead of tokens."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import gguf
import numpy as np
import pytest

import mlx_llama
from mlx_llama.errors import GGUFError, NonFiniteError
from mlx_llama.gguf_file import TensorInfo
from mlx_llama.quants import decode_tensor, set_subblock16_form
from test_quants import F16_FIELDS, QUANTIZED, T, random_blocks

BAD = [np.nan, np.inf, -np.inf]


def decode_quietly(qtype, blocks, shape, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning before the error fails the test
        return decode_tensor("bad.gguf", TensorInfo("w", int(qtype), tuple(shape), blocks), **kw)


SCALE_CASES = [(q, at) for q in QUANTIZED for at in F16_FIELDS[q]]


@pytest.mark.parametrize("expand", [False, True], ids=["compact", "expanded"])
@pytest.mark.parametrize("qtype,at", SCALE_CASES, ids=[f"{q.name}@{at}" for q, at in SCALE_CASES])
def test_non_finite_block_scale(qtype, at, expand):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for value in BAD:
        blocks = random_blocks(qtype, 4, 2)
        blocks.reshape(4, 2, type_size)[2, 1, at : at + 2] = np.array([value], np.float16).view(np.uint8)
        with pytest.raises(GGUFError) as e:
            decode_quietly(qtype, blocks, (4, 2 * block_size), expand=expand)
        assert str(e.value) == "bad.gguf: tensor 'w': a block scale is NaN or infinite", (value, str(e.value))


@pytest.mark.parametrize("form", ["dense", 8])
def test_non_finite_scale_in_the_other_subblock16_forms(form):
    blocks = random_blocks(T.Q6_K, 2, 1)
    blocks[1, 208:210] = np.array([np.inf], np.float16).view(np.uint8)
    set_subblock16_form(form)
    try:
        with pytest.raises(GGUFError, match="a block scale is NaN or infinite"):
            decode_quietly(T.Q6_K, blocks, (2, 256))
    finally:
        set_subblock16_form("blocks")


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_non_finite_dense_weight(qtype):
    for value in BAD:
        w = np.ones((5, 64), np.float32)
        w[3, 17] = value
        raw = w if qtype == T.F32 else w.astype(np.float16) if qtype == T.F16 else (w.view(np.uint32) >> 16).astype(np.uint16)
        for expand in (False, True):
            with pytest.raises(GGUFError) as e:
                decode_quietly(qtype, raw.view(np.uint8), (5, 64), expand=expand)
            assert str(e.value) == "bad.gguf: tensor 'w': holds NaN or infinity (row 3)", (value, str(e.value))
    # a large but finite float16 weight (65504) is not an error
    ok = np.full((2, 64), 65504, np.float16)
    assert decode_quietly(T.F16, ok.view(np.uint8), (2, 64)).shape == (2, 64)


def with_values(src, dst, name: str, values: np.ndarray, byte: int = 0):
    """A copy of the GGUF file `src` with the bytes of tensor `name` from `byte` on overwritten."""
    shutil.copy(src, dst)
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == name)
    with open(dst, "r+b") as fh:
        fh.seek(int(t.data_offset) + byte)
        fh.write(values.tobytes())
    return dst


def test_non_finite_weights_in_a_file_are_reported_at_load(tiny_gguf, tmp_path):
    path = tiny_gguf({"default": "Q8_0"})
    cases = [("output_norm.weight", np.array([np.nan], np.float32), 20, "holds NaN or infinity (row 0)"),
             ("blk.1.ffn_down.weight", np.array([np.inf], np.float16), 34 * 7, "a block scale is NaN or infinite")]
    for name, values, byte, problem in cases:
        bad = with_values(path, tmp_path / "bad.gguf", name, values, byte)
        for expand in (False, True):
            with pytest.raises(GGUFError) as e:
                mlx_llama.load(bad, cpu_dequantize=expand)
            assert str(e.value) == f"{bad}: tensor {name!r}: {problem}"


@pytest.fixture(scope="module")
def overflowing(tiny_gguf, tmp_path_factory):
    """Finite weights whose logits overflow float32: the final norm's weights near float32's max."""
    path = tiny_gguf("F32")
    return with_values(path, tmp_path_factory.mktemp("overflow") / "overflow.gguf", "output_norm.weight",
                       np.full(64, 3e38, np.float32))


def test_non_finite_logits_stop_generation(overflowing):
    model, tokenizer = mlx_llama.load(overflowing)
    with pytest.raises(NonFiniteError, match="the model computed NaN or infinite logits after 0 generated tokens"):
        mlx_llama.generate(model, tokenizer, "Hello", 4, temp=0)


def test_non_finite_logits_stop_constrained_generation(overflowing):
    """Under a constraint too: NaN logits are not masked into a token."""
    from mlx_llama import constraints

    model, tokenizer = mlx_llama.load(overflowing)
    with pytest.raises(NonFiniteError, match="after 0 generated tokens"):
        mlx_llama.generate(model, tokenizer, "Hello", 4, temp=0, constraint=constraints.regex("[a-z]+"))


def test_cli_prints_one_error_line_and_no_tokens(overflowing):
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", str(overflowing), "--raw", "Hello", "-n", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mlx_llama: error: the model computed NaN or infinite"), r.stderr
