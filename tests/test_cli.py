"""`mlx_llama generate` run as a user runs it, on the real default model."""

import subprocess
import sys

import pytest

from click.testing import CliRunner

import mlx_llama
from mlx_llama.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_llama", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_paris_with_default_model(smollm2):
    r = run_cli("generate", "--raw", "The capital of France is", "-n", "16", "--temp", "0", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    # the text streams to stdout; speed, memory and the BLAS line go to stderr
    assert "prompt: 5 tokens" in r.stderr and "tok/s" in r.stderr and "peak memory" in r.stderr
    assert "BLAS:" in r.stderr
    assert "Traceback" not in r.stderr
    # same text as the Python API gives
    model, tokenizer = smollm2  # the CLI's CPU mode: float32, weights expanded
    assert r.stdout == mlx_llama.generate(model, tokenizer, "The capital of France is", 16, temp=0) + "\n"


def test_seed_makes_sampling_reproducible(smollm2_path):
    runner = CliRunner()
    args = ["generate", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "12", "--temp", "1.0", "--seed"]
    first = runner.invoke(main, args + ["7"])
    again = runner.invoke(main, args + ["7"])
    other = runner.invoke(main, args + ["8"])
    assert first.exit_code == again.exit_code == other.exit_code == 0, first.output
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_bad_flags_are_one_line_errors(tmp_path):
    runner = CliRunner()
    for args, expected in [
        (["generate", "hi", "--temp", "abc"], "'abc' is not a valid float"),
        (["generate", "hi", "--top-p", "2"], "2.0 is not in the range"),
        (["generate", "hi", "-n", "0"], "0 is not in the range x>=1"),
        (["generate", "hi", "-p", "also"], "give the prompt one way"),
        (["generate"], "no prompt"),
        (["generate", "hi", "-m", str(tmp_path / "missing.gguf")], "missing.gguf: No such file or directory"),
        (["generate", "hi", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ]:
        r = runner.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.output, (args, r.output)
        assert r.output.startswith("mlx_llama: error: ") and r.output.count("\n") == 1, (args, r.output)  # one line
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_blas_line_and_switch(smollm2_path):
    """--verbose names the BLAS; MLX_LLAMA_BLAS=off turns the preload off; a bad library is reported."""
    import ctypes.util
    import os

    base = ["generate", "-m", str(smollm2_path), "--raw", "Hi", "-n", "1", "--temp", "0", "--verbose"]  # --raw: a 1-token prompt (reference BLAS is slow)
    env = dict(os.environ)
    for setting, expected in [("off", "MLX_LLAMA_BLAS=off"), ("/no/such/libblas.so", "could not load MLX_LLAMA_BLAS=/no/such/libblas.so")]:
        env["MLX_LLAMA_BLAS"] = setting
        r = subprocess.run([sys.executable, "-m", "mlx_llama", *base], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert expected in r.stderr
    assert "mlx_llama: warning: the model runs on the CPU with MLX's bundled reference BLAS (slow)" in r.stderr
    if ctypes.util.find_library("openblas"):
        r = run_cli(*base)
        assert "BLAS: libopenblas.so.0 (preloaded) | decode step: compiled" in r.stderr, r.stderr


def test_chat_template_is_the_default_applied_once_stopping_at_end_of_turn(smollm2_path):
    r = run_cli("generate", "What is the capital of Germany?", "--temp", "0", "-v")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout
    assert "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout
    assert "finish: stop" in r.stderr and "chat template: gguf" in r.stderr and "time to first token" in r.stderr
    # the prompt the model saw: the file's template rendered once (its default system prompt, one
    # user turn), counted by llama.cpp's tokenizer with special tokens parsed
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the reference)")
    once = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n")
    vocab = llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)
    assert f"prompt: {len(vocab.tokenize(once.encode(), add_bos=True, special=True))} tokens," in r.stderr, r.stderr
    raw = run_cli("generate", "What is the capital of Germany?", "--raw", "--temp", "0", "-n", "8", "-v")
    assert "chat template: none (raw prompt)" in raw.stderr and "prompt: 7 tokens" in raw.stderr, raw.stderr


def test_default_sampling_reproducible_with_seed(smollm2_path):
    """The acceptance command with llama.cpp's default sampler; a seed makes it reproducible."""
    runs = [run_cli("generate", "What is the capital of Germany?", "--seed", "1") for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert "Berlin" in runs[0].stdout and "finish: stop" in runs[0].stderr


def test_file_without_template_falls_back_to_raw(tiny_gguf, tmp_path):
    from gguf_edit import rewrite_gguf

    path = tmp_path / "no_template.gguf"
    rewrite_gguf(tiny_gguf("F32"), path, drop_keys=["tokenizer.chat_template"])
    runner = CliRunner()
    r = runner.invoke(main, ["generate", "-m", str(path), "hi", "-n", "2", "--temp", "0", "-v"])
    assert r.exit_code == 0, r.output
    assert "chat template: none (raw prompt)" in r.stderr
    asked = runner.invoke(main, ["generate", "-m", str(path), "hi", "-n", "2", "--chat"])
    assert asked.exit_code == 2 and "has no chat template" in asked.output
    both = runner.invoke(main, ["generate", "-m", str(path), "hi", "--raw", "--system", "be brief"])
    assert both.exit_code == 2 and "cannot take --chat-template or --system" in both.output


def test_templated_prompt_is_not_wrapped_twice(smollm2_path):
    prompt = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
    warned = run_cli("generate", prompt, "--temp", "0", "-n", "12")
    assert "already contains the chat template's markers" in warned.stderr and "pass --raw" in warned.stderr
    raw = run_cli("generate", prompt, "--raw", "--temp", "0", "-n", "12")
    assert "warning" not in raw.stderr
    assert warned.stdout == raw.stdout  # sent as it is, not wrapped again


def test_stop_strings_and_template_errors(smollm2_path):
    r = run_cli("generate", "--raw", "Count: one, two,", "--temp", "0", "-n", "40", "--stop", "five")
    assert r.returncode == 0 and "finish: stop" in r.stderr
    assert r.stdout == " three, four, \n"  # the text before the stop string; "five" not printed
    bad = CliRunner().invoke(main, ["generate", "-m", str(smollm2_path), "hi", "--chat-template", "nope"])
    assert bad.exit_code == 2 and "unknown chat template 'nope'" in bad.output


def test_penalties_and_logit_bias_reach_the_sampler(smollm2_path):
    runner = CliRunner()
    base = ["generate", "-m", str(smollm2_path), "--raw", "Once upon a time", "-n", "20", "--temp", "0"]
    plain = runner.invoke(main, base)
    penalized = runner.invoke(main, base + ["--frequency-penalty", "1.5"])
    assert plain.exit_code == penalized.exit_code == 0
    assert plain.stdout != penalized.stdout
    first = mlx_llama.load(smollm2_path)[1].encode(plain.stdout)[0]
    banned = runner.invoke(main, base + ["-l", f"{first}-inf"])
    assert banned.exit_code == 0 and banned.stdout != plain.stdout
    bad = runner.invoke(main, base + ["-l", "abc"])
    assert bad.exit_code == 2 and "expected TOKEN_ID+BIAS" in bad.output


def test_context_limits(tiny_gguf):
    """A prompt longer than the context is a one-line error; a generation that reaches the
    context stops there with that reason (the tiny model's context: 64 tokens)."""
    path = tiny_gguf("F32", context_length=64)
    runner = CliRunner()
    long = runner.invoke(main, ["generate", "-m", str(path), "--raw", "word " * 80, "-n", "4"])
    assert long.exit_code == 2 and "more than the model's context of 64" in long.output
    assert "Traceback" not in long.output
    r = runner.invoke(main, ["generate", "-m", str(path), "--raw", "word " * 50, "-n", "100", "--temp", "0",
                             "--stop", "\x00never"])
    assert r.exit_code == 0, r.output
    assert "finish: context" in r.stderr
    prompt_tokens = int(r.stderr.split("prompt: ")[1].split(" tokens")[0])
    generated = int(r.stderr.split("generation: ")[1].split(" tokens")[0])
    assert prompt_tokens + generated == 64


def test_bench_table_and_json(tiny_gguf):
    """`mlx_llama bench`: llama-bench's table (pp and tg rows, tokens/s mean ± sd) and --json."""
    import json

    path = str(tiny_gguf("Q8_0"))
    r = run_cli("bench", "-m", path, "-p", "32", "-n", "8", "-r", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split("|")[1:-1] and "t/s" in lines[0] and len(lines) == 4
    assert "pp32" in lines[2] and "tg8" in lines[3] and "±" in lines[3]
    j = json.loads(run_cli("bench", "-m", path, "-p", "16", "-n", "0", "-r", "2", "--json").stdout)
    assert [t["test"] for t in j["tests"]] == ["pp16"] and len(j["tests"][0]["seconds"]) == 2 and j["tests"][0]["tps_mean"] > 0
    bad = run_cli("bench", "-m", path, "-p", "200", "-n", "100")
    assert bad.returncode == 2 and "context" in bad.stderr and bad.stderr.count("\n") == 1
