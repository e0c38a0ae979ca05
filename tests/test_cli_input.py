"""What `mlx_llama generate` takes as a user gives it: the prompt from an argument, -p, -f or
stdin; -m as a GGUF file, a converted directory, or nothing (the default model)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlx_llama(*args, stdin: bytes | None = None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=env)


def test_prompt_from_stdin_when_piped(smollm2_path):
    """`echo "What is 2+2?" | mlx_llama generate --temp 0` answers."""
    r = subprocess.run('echo "What is 2+2?" | "$PY" -m mlx_llama generate --temp 0', shell=True, capture_output=True,
                       text=True, env=dict(os.environ, PY=sys.executable), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout and "finish: stop" in r.stderr


def test_every_way_of_giving_the_prompt_is_the_same_prompt(smollm2_path, tmp_path):
    """The argument, -p, -p - with stdin, and -f FILE (one trailing newline dropped, as llama.cpp's -f)."""
    (tmp_path / "prompt.txt").write_text("The capital of France is\n")
    base = ["-m", str(smollm2_path), "--raw", "-n", "6", "--temp", "0"]
    runs = [
        mlx_llama("generate", "The capital of France is", *base),
        mlx_llama("generate", "-p", "The capital of France is", *base),
        mlx_llama("generate", "-p", "-", *base, stdin=b"The capital of France is\n"),
        mlx_llama("generate", "-f", str(tmp_path / "prompt.txt"), *base),
        mlx_llama("generate", *base, stdin=b"The capital of France is"),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr.decode()
        assert b"prompt: 5 tokens" in r.stderr
    assert len({r.stdout for r in runs}) == 1 and b"Paris" in runs[0].stdout


@pytest.mark.parametrize("args, stdin, expected", [
    (["-p", "-"], b"\xff\xfe bad", "the prompt from stdin is not valid UTF-8"),
    (["hi", "-f", "x.txt"], None, "give the prompt one way"),
    (["-f", "/no/such/prompt.txt"], None, "/no/such/prompt.txt: No such file or directory"),
    ([], b"", "no prompt"),
])
def test_prompt_errors_are_one_line(args, stdin, expected):
    r = mlx_llama("generate", *args, stdin=stdin, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_llama: error: ") and expected in lines[0], lines


def test_model_as_a_converted_directory(smollm2_path, tmp_path):
    """-m DIR written by convert/gguf_to_mlx.py: the same answer as the GGUF file it came from."""
    out = tmp_path / "smol-mlx"
    c = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "gguf_to_mlx.py"), str(smollm2_path), str(out),
                        "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr
    question = ["What is the capital of Germany?", "--temp", "0", "-n", "12"]
    from_dir = mlx_llama("generate", "-m", str(out), *question)
    from_gguf = mlx_llama("generate", "-m", str(smollm2_path), *question)
    assert from_dir.returncode == 0, from_dir.stderr.decode()
    assert from_dir.stdout == from_gguf.stdout and b"Berlin" in from_dir.stdout


def test_model_that_is_not_a_file(tmp_path):
    empty = mlx_llama("generate", "hi", "-m", str(tmp_path), timeout=60)
    assert empty.returncode == 2 and b"not a GGUF file or a model directory (no config.json)" in empty.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = mlx_llama("generate", "hi", "-m", str(fifo), timeout=60)
    assert r.returncode == 2 and b"not a regular file" in r.stderr


def test_slow_blas_warning_once_for_python_users(smollm2_path):
    """`import mlx.core` before `import mlx_llama` leaves MLX's reference BLAS: loading a model on
    the CPU then warns once, saying how to fix it; MLX_LLAMA_BLAS_WARNING=off silences it."""
    code = ("import mlx.core, mlx_llama, sys\n"
            "for _ in range(2): mlx_llama.load(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-c", code, str(smollm2_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("SlowBLASWarning") == 1, r.stderr
    assert "import mlx_llama before mlx.core" in r.stderr
    quiet = subprocess.run([sys.executable, "-c", code, str(smollm2_path)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, MLX_LLAMA_BLAS_WARNING="off"))
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr, quiet.stderr
