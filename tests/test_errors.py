"""Bad files give one `GGUFError` line naming the file and the problem — and exit 2 in the CLI."""

import subprocess
import sys

import pytest

import mlx_llama
from gguf_edit import V, rewrite_gguf


@pytest.fixture(scope="module")
def good(tiny_gguf):
    return tiny_gguf("Q4_1")


def broken_files(good, tmp):
    """(description, path, expected message fragment) for each kind of damage."""
    data = good.read_bytes()
    cases = []

    def add(name, expected, writer):
        path = tmp / f"{name}.gguf"
        writer(path)
        cases.append((name, path, expected))

    add("bad_magic", "not a GGUF file", lambda p: p.write_bytes(b"GGML" + data[4:]))
    add("cut_header", "truncated or corrupt header", lambda p: p.write_bytes(data[:300]))
    add("cut_tensor", "file is truncated or corrupt: tensor", lambda p: p.write_bytes(data[: len(data) - 1000]))
    add("missing_key", "missing metadata key 'llama.block_count'", lambda p: rewrite_gguf(good, p, drop_keys=["llama.block_count"]))
    add("ill_typed_key", "'llama.block_count' has type str, expected int",
        lambda p: rewrite_gguf(good, p, set_keys={"llama.block_count": ("two", V.STRING)}))
    add("bad_shape", "tensor 'blk.0.ffn_gate.weight' has shape (64, 128), expected (128, 64)",
        lambda p: rewrite_gguf(good, p, tensor_shapes={"blk.0.ffn_gate.weight": (64, 128)}))
    add("missing_tensor", "missing tensor 'blk.1.attn_k.weight'", lambda p: rewrite_gguf(good, p, drop_tensors=["blk.1.attn_k.weight"]))
    add("wrong_arch", "unsupported architecture 'falcon'",
        lambda p: rewrite_gguf(good, p, set_keys={"general.architecture": ("falcon", V.STRING)}))
    add("no_file", "No such file", lambda p: None)
    return cases


def test_broken_files(good, tmp_path):
    mlx_llama.load(good)  # the undamaged file loads
    for name, path, expected in broken_files(good, tmp_path):
        with pytest.raises(mlx_llama.GGUFError) as e:
            mlx_llama.load(path)
        message = str(e.value)
        assert message.startswith(str(path)), name
        assert expected in message, (name, message)
        assert "\n" not in message, name


@pytest.mark.slow  # test_cli_hostile and test_fuzz run the CLI on broken files by default
def test_cli_reports_broken_files_in_one_line(good, tmp_path):
    for name, path, expected in broken_files(good, tmp_path)[:4]:
        r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", str(path), "hi", "-n", "2"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlx_llama: error: ") and expected in lines[0], (name, r.stderr)
