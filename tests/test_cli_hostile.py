"""Bad command lines: each is one line `mlx_llama: error: …` and exit status 2, quickly — flags out
of range (NaN and infinity included), text that is not UTF-8, models that are not regular files,
a penalty window larger than the context (it was allocated from the flag: 7.45 GiB for 10^9)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from mlx_llama.cli import main

BAD = "hi\udcff"  # what Python makes of the argv bytes b"hi\xff" (surrogateescape)

# (args, a fragment of the one line); MODEL is replaced by a tiny model's path, DIR by a directory
USAGE = [
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=18446744073709551615"),
    (["--seed", str(2**70)], "is not in the range 0<=x<=18446744073709551615"),
    (["--seed", "abc"], "'abc' is not a valid integer range"),
    (["--temp", "nan"], "Invalid value for '--temp': 'nan' is not a finite number"),
    (["--temp", "inf"], "'inf' is not a finite number"),
    (["--temp", "-1"], "-1.0 is not in the range x>=0"),
    (["--top-p", "nan"], "'nan' is not a finite number"),
    (["--top-p", "1.5"], "1.5 is not in the range 0<=x<=1"),
    (["--min-p", "-0.1"], "-0.1 is not in the range 0<=x<=1"),
    (["--repeat-penalty", "0"], "0.0 is not in the range x>0"),
    (["--repeat-penalty", "nan"], "'nan' is not a finite number"),
    (["--repeat-last-n", "-1"], "-1 is not in the range x>=0"),
    (["--frequency-penalty", "nan"], "Invalid value for '--frequency-penalty': 'nan' is not a finite number"),
    (["--presence-penalty", "-inf"], "Invalid value for '--presence-penalty': '-inf' is not a finite number"),
    (["--top-k", "-1"], "-1 is not in the range x>=0"),
    (["-n", "0"], "0 is not in the range x>=1"),
    (["-n", "many"], "'many' is not a valid integer"),
    (["-l", "5+nan"], "--logit-bias '5+nan': expected TOKEN_ID+BIAS"),
    (["-l", "abc"], "--logit-bias 'abc': expected TOKEN_ID+BIAS"),
    (["-l", "5+"], "--logit-bias '5+': expected TOKEN_ID+BIAS"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
    (["--temp"], "Option '--temp' requires an argument"),
    (["-p", BAD], "Invalid value for '-p' / '--prompt': not valid UTF-8 (at character 2)"),
    (["--system", BAD], "Invalid value for '--system': not valid UTF-8 (at character 2)"),
    (["--stop", "ok", "--stop", BAD], "Invalid value for '--stop': not valid UTF-8 (at character 2)"),
    (["--chat-template", BAD], "Invalid value for '--chat-template': not valid UTF-8"),
    (["-f", "DIR"], "Invalid value for '-f' / '--file': File 'DIR' is a directory"),
    (["-p", "also"], "give the prompt one way"),
    (["--raw", "--system", "s"], "--raw sends the prompt as it is: it cannot take --chat-template or --system"),
]
MODEL = [
    (["-m", "DIR"], "DIR: not a GGUF file or a model directory (no config.json)"),
    (["-m", "DIR/fifo.gguf"], "DIR/fifo.gguf: not a regular file or a model directory"),
    (["-m", "/dev/zero"], "/dev/zero: not a regular file or a model directory"),
    (["-m", "DIR/missing.gguf"], "DIR/missing.gguf: No such file or directory"),
    (["-m", "MODEL", "--repeat-last-n", str(10**9), "--repeat-penalty", "1.1"],
     "repeat_last_n 1000000000 is more than the model's context of 256 tokens"),
    (["-m", "MODEL", "-l", "999999999+1"], "logit_bias: token 999999999 is outside the vocabulary"),
    (["-m", "MODEL", "--chat-template", "nope"], "unknown chat template 'nope'"),
]
OTHER = [
    (["generate", "-f", "DIR/missing.txt"], "DIR/missing.txt: No such file or directory"),
    (["chat", "--seed", "-1"], "-1 is not in the range 0<=x<=18446744073709551615"),
    (["chat", "--temp", "nan"], "'nan' is not a finite number"),
    (["chat", "-m", "DIR/fifo.gguf"], "not a regular file"),
    (["perplexity", "-f", "DIR/missing.txt"], "does not exist"),
    (["perplexity", "-f", "DIR/text.txt", "--ctx", "2"], "2 is not in the range x>=4"),
    (["perplexity", "-f", "DIR/text.txt", "--chunks", "0"], "0 is not in the range x>=1"),
    (["info", "DIR/fifo.gguf"], "DIR/fifo.gguf: not a regular file (a FIFO)"),
    (["info", "/dev/zero"], "/dev/zero: not a regular file (a device)"),
    (["info", "DIR"], "is a directory"),
    (["no-such-command"], "No such command 'no-such-command'"),
]
CASES = [(["generate", "hi", *a], e) for a, e in USAGE + MODEL] + OTHER


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_gguf):
    d = tmp_path_factory.mktemp("cli")
    os.mkfifo(d / "fifo.gguf")  # opening it for reading would wait for a writer forever
    (d / "text.txt").write_text("some text " * 50)
    return {"DIR": str(d), "MODEL": str(tiny_gguf("F32"))}


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_command_line_is_one_line(places, args, expected):
    def fill(text: str) -> str:
        for name, value in places.items():
            text = text.replace(name, value)
        return text

    start = time.perf_counter()
    r = CliRunner().invoke(main, [fill(a) for a in args])
    assert time.perf_counter() - start < 30
    assert r.exit_code == 2, (args, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.output.startswith("mlx_llama: error: ") and r.output.count("\n") == 1, (args, r.output)
    assert fill(expected) in r.output, (args, r.output)


def test_argv_bytes_that_are_not_utf8(places):
    """The real thing: argv bytes, decoded by Python itself, as a shell hands them over."""
    r = subprocess.run([sys.executable.encode(), b"-m", b"mlx_llama", b"generate", b"-m", places["MODEL"].encode(),
                        b"caf\xe9 au lait"], capture_output=True, timeout=120)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr == b"mlx_llama: error: Invalid value for '[PROMPT]': not valid UTF-8 (at character 3)\n", r.stderr


def test_a_fifo_as_model_does_not_block(places):
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", places["DIR"] + "/fifo.gguf", "hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr
    assert time.perf_counter() - start < 10
