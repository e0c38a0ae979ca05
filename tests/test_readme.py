"""Every code block in the README runs as written.

`bash` blocks: each command line runs in a shell whose PATH finds this environment's
`mlx_llama`; a `# → TEXT` line after a command says TEXT is in what it prints (in `python`
blocks, in what the block prints). `pip install …`
parts are checked to name extras that pyproject.toml defines (installing is what CI does), and
`python -m pytest` is this suite itself. `python` blocks run as written, in a fresh process.
`text` blocks (usage synopses) are not code. A block in any other language fails the test:
the README must not hold code that nothing runs.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from watched import run_watched

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN = {"bash", "python"}
NOT_CODE = {"text"}


def blocks() -> list[tuple[int, str, str]]:
    """(line number, language, body) of every fenced block."""
    out, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out.append((i + 1, m.group(1), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return out


def commands(body: str) -> list[tuple[str, list[str]]]:
    """(command line, expected texts from the `# → TEXT` lines after it)."""
    out = []
    for line in body.splitlines():
        if line.startswith("# →"):
            out[-1][1].append(line[len("# →"):].strip())
        elif line.strip() and not line.startswith("#"):
            out.append((line, []))
    return out


def test_every_block_has_a_known_language():
    for line, lang, _ in blocks():
        assert lang in RUN | NOT_CODE, f"README.md:{line}: a ```{lang or ''} block; mark it bash, python or text"


def check_pip_install(part: str):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    m = re.fullmatch(r'pip install -e "\.\[([\w,]+)\]"', part.strip())
    assert m, f"unexpected install command {part!r}"
    assert set(m.group(1).split(",")) <= extras, part


def shell_env() -> dict:
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


# Blocks that talk to `mlx_llama serve` (the Server section) run together, in README order, by
# test_server_blocks: it starts the server where the block says `mlx_llama serve … &`, on a free
# port that replaces 8080 in the blocks, and stops it at the end.
SERVER_URL = "http://127.0.0.1:8080"
SERVER_BLOCKS = [(line, lang, body) for line, lang, body in blocks() if SERVER_URL in body]
BASH = [(line, body) for line, lang, body in blocks() if lang == "bash" and SERVER_URL not in body]
PYTHON = [(line, body) for line, lang, body in blocks() if lang == "python" and SERVER_URL not in body]


def check_command(line: int, part: str, expected: list[str], cwd) -> None:
    assert shlex.split(part)[0] in ("mlx_llama", "echo", "curl"), f"README.md:{line}: {part}"
    r = run_watched(part, shell=True, env=shell_env(), cwd=cwd, timeout=600)
    assert r.returncode == 0, f"README.md:{line}: {part}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    for text in expected:
        assert text in r.stdout, f"README.md:{line}: {part} printed {r.stdout!r}, not {text!r}"


def check_python(line: int, body: str, cwd) -> None:
    r = run_watched([sys.executable, "-c", body], cwd=cwd, timeout=600)
    assert r.returncode == 0, f"README.md:{line}:\n{r.stderr}"
    assert "Warning" not in r.stderr, r.stderr
    for text in (x[len("# →"):].strip() for x in body.splitlines() if x.startswith("# →")):
        assert text in r.stdout, f"README.md:{line}: printed {r.stdout!r}, not {text!r}"


@pytest.mark.parametrize("line, body", BASH, ids=[f"line{n}" for n, _ in BASH])
def test_shell_block(line, body, smollm2_path, tmp_path):
    for command, expected in commands(body):
        for part in command.split(" && "):
            if part.startswith("pip install"):
                check_pip_install(part)
            elif part.startswith("python -m pytest"):
                continue  # this suite
            else:
                check_command(line, part, expected, tmp_path)


@pytest.mark.parametrize("line, body", PYTHON, ids=[f"line{n}" for n, _ in PYTHON])
def test_python_block(line, body, smollm2_path, tmp_path):
    check_python(line, body, tmp_path)


@pytest.mark.skipif(not SERVER_BLOCKS, reason="the README has no server blocks")
def test_server_blocks(smollm2_path, tmp_path):
    from server_process import ServerProcess

    server = None
    try:
        for line, lang, body in SERVER_BLOCKS:
            if lang == "python":
                assert server is not None, f"README.md:{line}: a server block before `mlx_llama serve`"
                check_python(line, body.replace(SERVER_URL, server.url), tmp_path)
                continue
            for command, expected in commands(body):
                if command.startswith("mlx_llama serve"):
                    assert command.endswith("&"), f"README.md:{line}: the server runs in the background"
                    server = ServerProcess(*shlex.split(command[:-1])[2:])
                else:
                    check_command(line, command.replace(SERVER_URL, server.url), expected, tmp_path)
    finally:
        if server is not None:
            log = server.stop()
            assert "Traceback" not in log, log
