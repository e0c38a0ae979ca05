"""convert/gguf_to_mlx.py: the converted directory reloads to the same model."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_llama

ROOT = Path(__file__).resolve().parent.parent


def load_converted(out):
    model, _ = mlx_llama.load(out)
    return model


def test_convert_round_trip(tiny_gguf, tmp_path):
    path = tiny_gguf({"default": "Q4_1", "token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "F16"}, tied=False)
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "gguf_to_mlx.py"), str(path), str(out), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantized layers" in r.stdout and (out / "weights.safetensors").exists()
    original, _ = mlx_llama.load(path, dtype=mx.float32, cpu_dequantize=False)
    converted = load_converted(str(out))
    tokens = mx.array([list(range(5, 45))])
    np.testing.assert_array_equal(np.array(converted(tokens)), np.array(original(tokens)))


def test_convert_reports_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "gguf_to_mlx.py"), str(bad), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a GGUF file" in r.stderr


def test_convert_round_trip_with_k_quant_blocks(tiny_gguf, tmp_path):
    """Q6_K/Q2_K layers (kept as the file's blocks) survive the conversion, embedding included."""
    import pytest

    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) makes the quantized file")
    from make_quant_fixtures import requantize

    path = tmp_path / "k.gguf"
    requantize(str(tiny_gguf("F32", hidden=256, ffn=512, tied=False)), str(path), {"output": "Q2_K"}, ftype="Q6_K")
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "gguf_to_mlx.py"), str(path), str(out), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    original, _ = mlx_llama.load(path, dtype=mx.float32, cpu_dequantize=False)
    assert type(original.token_embd).__name__ == "BlockEmbedding" and type(original.output).__name__ == "BlockLinear"
    converted = load_converted(str(out))
    assert type(converted.token_embd).__name__ == "BlockEmbedding"
    tokens = mx.array([list(range(5, 45))])
    np.testing.assert_array_equal(np.array(converted(tokens)), np.array(original(tokens)))
