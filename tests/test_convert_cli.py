"""`mlx_llama convert` used as a person uses it: existing output needs --force, an interrupted
conversion leaves nothing (tiny models); on the default model (SmolLM2-135M Q4_1, `slow`), the
directory it writes is the GGUF file's model in every command and converting it back gives the
same file. `mlx_lm_server_answer` serves a directory with mlx-lm (`test_convert_smollm2.py`).
"""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import mlx_llama
from mlx_llama.convert import gguf_to_mlx
from mlx_llama.gguf_file import GGUFFile

slow = pytest.mark.slow


def run_cli(*args, stdin=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smol_dir(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "SmolLM2-mlx"
    r = run_cli("convert", "gguf-to-mlx", smollm2_path, out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["GGUF", "type", "tensors", "MLX", "form", "max", "|Δ|", "vs", "GGUF"]
    assert any(line.split()[:3] == ["Q4_1", "210", "affine"] and line.endswith("0 (exact)") for line in lines), r.stdout
    assert lines[-1].startswith(f"wrote {out}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory):
    """A float32 mlx-lm directory of a tiny Llama (49152-token vocabulary, 3.5 MB of tokenizer)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-mlx"
    gguf_to_mlx(tiny_gguf("F32", tied=False), out, dtype="float32")
    return out


@slow
def test_back_to_gguf_is_the_same_file(smollm2_path, smol_dir, tmp_path):
    out = tmp_path / "back.gguf"
    r = run_cli("convert", "mlx-to-gguf", smol_dir, out)
    assert r.returncode == 0, r.stderr
    assert "affine 4-bit, group 32  Q4_1" in r.stdout and "0 (exact)" in r.stdout
    original, back = GGUFFile(smollm2_path), GGUFFile(out)
    for name, t in original.tensors.items():  # every tensor, bit for bit (Q4_1, Q8_0, F32)
        assert back.tensors[name].ggml_type == t.ggml_type
        np.testing.assert_array_equal(np.asarray(back.tensors[name].data), np.asarray(t.data), err_msg=name)
    tokenizer_keys = [k for k in original.metadata if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    assert {k: back.metadata[k] for k in tokenizer_keys} == {k: original.metadata[k] for k in tokenizer_keys}


@slow
def test_model_directory_in_every_command(smollm2, smol_dir):
    """-m DIR: the same text, chat answer and perplexity as the GGUF file (the directory holds
    its every value)."""
    from resources import botchan

    from mlx_llama.perplexity import perplexity

    model, tokenizer = smollm2
    r = run_cli("generate", "-m", smol_dir, "--raw", "The capital of France is", "-n", "12", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == mlx_llama.generate(model, tokenizer, "The capital of France is", 12, temp=0) + "\n"

    r = run_cli("chat", "-m", smol_dir, "--temp", "0", "-n", "24", stdin="What is the capital of Germany?\n")
    assert r.returncode == 0, r.stderr
    assert mlx_llama.generate(model, tokenizer, "What is the capital of Germany?", 24, chat=True, temp=0) in r.stdout

    text = botchan().read_text(encoding="utf-8")[:20000]
    (smol_dir.parent / "text.txt").write_text(text, encoding="utf-8")
    r = run_cli("perplexity", "-m", smol_dir, "-f", smol_dir.parent / "text.txt", "--ctx", "128", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    assert f"Final estimate: PPL = {perplexity(model, tokenizer, text, ctx=128, chunks=2).value:.4f}" in r.stdout


def test_existing_output_needs_force(tiny_gguf, tiny_dir, tmp_path):
    out = tmp_path / "dir"
    out.mkdir()
    (out / "notes.txt").write_text("someone's file")
    r = run_cli("convert", "gguf-to-mlx", tiny_gguf("F32", tied=False), out)
    assert r.returncode == 2 and r.stderr == f"mlx_llama: error: {out}: exists (pass --force to replace it)\n"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone's file")
    r = run_cli("convert", "mlx-to-gguf", tiny_dir, out, "--outtype", "q8_0")
    assert r.returncode == 2 and r.stderr == f"mlx_llama: error: {out}: exists (pass --force to replace it)\n"
    assert out.read_bytes() == b"someone's file"
    r = run_cli("convert", "mlx-to-gguf", tiny_dir, out, "--force")
    assert r.returncode == 0, r.stderr
    assert GGUFFile(out).architecture == "llama" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "model.gguf"]


def interrupt_when(proc, ready, sig, timeout=300):
    """Send `sig` to `proc` as soon as `ready()` holds (polled every 10 ms); its exit status."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


# SIGINT with `-m slow`: in full-suite runs it sometimes had no effect (the conversion finished),
# never when run alone; see test_chat_cli's Ctrl-C test
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL])
def test_conversion_killed_mid_write_leaves_no_output(tiny_dir, tmp_path, sig):
    out = tmp_path / "out.gguf"
    partial = lambda: list(tmp_path.glob(".out.gguf.partial-*"))
    command = [sys.executable, "-m", "mlx_llama", "convert", "mlx-to-gguf", str(tiny_dir), str(out), "--outtype", "q8_0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # mid-write: the header begun, the tensors (2 s of encoding) to come
    status = interrupt_when(proc, lambda: partial() and partial()[0].stat().st_size > 0, sig)
    assert not out.exists()
    if sig == signal.SIGINT:  # Ctrl-C: the partial file removed on the way out
        assert status == 130 and proc.stderr.read() == "mlx_llama: interrupted: nothing written\n"
        assert not partial()
    else:  # no chance to clean up: the next conversion to the same place removes it
        assert status == -signal.SIGKILL and len(partial()) == 1
        written = partial()[0].stat().st_size
        r = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and not partial(), r.stderr
        assert out.stat().st_size > written  # it was killed mid-write


def test_terminated_directory_conversion_leaves_nothing(smollm2_path, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_llama", "convert", "gguf-to-mlx", str(smollm2_path), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = interrupt_when(proc, lambda: list(tmp_path.glob(".out.partial-*")), signal.SIGTERM)
    assert status == 130 and not out.exists() and not list(tmp_path.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_lm_server_answer(model_dir, messages, max_tokens, timeout=300) -> str:
    """Start `mlx_lm.server` on `model_dir`, send one chat request (greedy), return the answer."""
    pytest.importorskip("mlx_lm", reason="mlx-lm serves the converted directory (pip install mlx-lm)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        deadline = time.time() + timeout
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except (ConnectionError, urllib.error.URLError):
                assert time.time() < deadline, "mlx_lm.server did not start"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
