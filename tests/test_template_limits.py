"""Chat templates render under limits: hostile ones are refused or stopped in time with bounded
memory, ordinary ones are untouched (the goldens in test_chat_template), and a file whose own
template is broken fails at load, before its weights are read."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mlx_llama
from mlx_llama import loader
from make_fixture import CHATML, make_tiny_vocab
from mlx_llama.chat_template import ChatTemplate, RenderLimits, default_limits, set_render_limits
from mlx_llama.errors import ChatTemplateLimitError, GGUFError
from template_dos import CASES
from test_tokenizer import report

HERE = Path(__file__).resolve().parent
MEMORY_CAP_MB = 512
HELLO = [{"role": "user", "content": "Hello"}]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_hostile_templates_are_refused_or_stopped(capsys):
    # the script caps its own memory (a failed guard fails the run, not the machine): no preexec_fn,
    # whose fork would run OpenBLAS's fork handler in this process (it can hang)
    r = subprocess.run([sys.executable, str(HERE / "template_dos.py"), "--cap-data", str(2 << 30)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["case"] for x in results] == list(CASES)
    limit = default_limits().seconds
    for x in results:
        kind = CASES[x["case"]][0]
        assert x["outcome"] == "ChatTemplateLimitError", x
        assert ("took longer than" in x["error"]) == (kind == "time"), x
        # stopped at the limit, refused at once: in CPU time, which a busy machine does not stretch
        # (a stop waits for the C call running at the limit: with ~10 processes per core, wordwrap's
        # came 1.3 s late), and in wall time with room for such a machine
        assert x["cpu_seconds"] < (limit + 1.0 if kind == "time" else 1.0), x
        assert x["seconds"] < (limit if kind == "time" else 0) + 5.0, x
        assert x["rss_mb"] < MEMORY_CAP_MB and x["python_mb"] < MEMORY_CAP_MB, x
    worst = max(results, key=lambda x: x["seconds"])
    report(capsys, f"{len(results)} hostile templates: {sum(CASES[x['case']][0] == 'time' for x in results)} stopped by "
                   f"the time limit, the rest refused; slowest {worst['case']!r} {worst['seconds']:.2f}s; peak RSS above "
                   f"the start ≤ {max(x['rss_mb'] for x in results):.0f} MB")
    for x in results:
        report(capsys, f"  {x['case']:34} {x['seconds']:5.2f}s  RSS +{x['rss_mb']:6.1f} MB  {x['error'][:70]}")


def test_limits_are_configurable():
    start = time.perf_counter()
    with pytest.raises(ChatTemplateLimitError, match="rendering took longer than 0.2 s"):
        ChatTemplate(LOOPS, limits=RenderLimits(seconds=0.2)).render(HELLO)
    assert time.perf_counter() - start < 1.0
    small = RenderLimits(max_output=10)
    with pytest.raises(ChatTemplateLimitError, match="the text would be 11 characters long, more than 10"):
        ChatTemplate("{{ 'x' * 5 }}{{ 'y' * 6 }}", limits=small).render(HELLO)
    assert ChatTemplate("{{ 'x' * 10 }}", limits=small).render(HELLO) == "x" * 10
    before = default_limits()
    try:
        set_render_limits(max_int_bits=8)
        with pytest.raises(ChatTemplateLimitError, match="2 \\*\\* 9 has more than 8 bits"):
            ChatTemplate("{{ 2 ** 9 }}").render(HELLO)
        assert ChatTemplate("{{ 2 ** 8 }}").render(HELLO) == "256"
    finally:
        set_render_limits(**before.__dict__)
    assert default_limits() == before


def test_ordinary_values_pass():
    """What templates do: strings, lists, JSON with an indent, widths and powers of sane size."""
    src = ("{{ messages|tojson(indent=2) }}|{{ 'ab' * 3 }}|{{ [0] * 3 }}|{{ 2 ** 64 }}|{{ '%5d' % 42 }}|"
           "{{ '{:>6}'.format('x') }}|{{ 'a\nb'|indent(4) }}|{{ ['x', 'y']|join(', ') }}|{{ 'abc'.replace('b', 'BB') }}")
    out = ChatTemplate(src).render(HELLO, add_generation_prompt=False)
    assert out == ('[\n  {\n    "role": "user",\n    "content": "Hello"\n  }\n]|ababab|[0, 0, 0]|18446744073709551616|'
                   '   42|     x|a\n    b|x, y|aBBc')


def render_then_wait(src: str, limits: RenderLimits) -> str:
    """"rendered" or "stopped" (the limit error), then 2 ms in which a stray interruption from the
    watchdog would surface."""
    try:
        ChatTemplate(src, limits=limits).render(HELLO)
        outcome = "rendered"
    except ChatTemplateLimitError:
        outcome = "stopped"
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    return outcome


def test_the_watchdog_never_fires_outside_a_render():
    """Renders that end right around their deadline: each returns or raises the limit error, and
    no stray interruption lands in the code that runs after them."""
    src = "{% for i in range(20000) %}{{ i % 2 }}{% endfor %}"
    t = time.perf_counter()
    ChatTemplate(src, limits=RenderLimits(seconds=30)).render(HELLO)
    took = time.perf_counter() - t
    outcomes = {render_then_wait(src, RenderLimits(seconds=took * (0.2 + i / 20))) for i in range(60)}  # 0.2× to 3.2× its time
    assert outcomes == {"rendered", "stopped"}


def test_a_limit_shorter_than_starting_the_watchdog():
    """A limit so short that the watchdog fires while its own thread starts (as a long one can on
    a busy machine): the render is refused with the limit error or finishes; the interruption
    never escapes into the caller."""
    outcomes = {render_then_wait(CHATML, RenderLimits(seconds=1e-6)) for _ in range(100)}
    assert "stopped" in outcomes


def test_renders_in_threads_have_their_own_limits():
    results = {}

    def render(name, src, seconds):
        try:
            results[name] = ChatTemplate(src, limits=RenderLimits(seconds=seconds)).render(HELLO)
        except ChatTemplateLimitError as e:
            results[name] = e

    threads = [threading.Thread(target=render, args=("hostile", LOOPS, 0.5))]
    threads += [threading.Thread(target=render, args=(f"chatml{i}", CHATML, 10)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert isinstance(results["hostile"], ChatTemplateLimitError)
    assert all(results[f"chatml{i}"] == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" for i in range(3))


@pytest.fixture(scope="module")
def template_file(tmp_path_factory, tiny_gguf):
    vocab = make_tiny_vocab(tmp_path_factory.mktemp("vocab") / "tiny.gguf")
    return lambda source: tiny_gguf({"default": "Q8_0"}, vocab_from=vocab, extra_metadata={"tokenizer.chat_template": source})


@pytest.mark.parametrize("source,problem", [
    ("{% for %}", "tokenizer.chat_template: syntax error on line 1: "),
    ("{{ raise_exception('no') }}", "tokenizer.chat_template: no"),
    (LOOPS, "tokenizer.chat_template: rendering took longer than 1 s"),
    ("{{ 'a' * 10 ** 9 }}", "tokenizer.chat_template: a repetition would be 1000000000 characters long"),
], ids=["syntax", "raises", "loops", "repetition"])
def test_a_broken_file_template_fails_before_the_weights(template_file, monkeypatch, source, problem):
    path = template_file(source)

    def no_weights(*a, **k):
        raise AssertionError("the weights were read")

    with monkeypatch.context() as m:
        m.setattr(loader, "load_model", no_weights)
        with pytest.raises(GGUFError) as e:
            mlx_llama.load(path)
    assert str(e.value).startswith(f"{path}: {problem}") and "\n" not in str(e.value)
    model, tokenizer = mlx_llama.load(path, check_template=False)  # not using the template: it loads
    assert tokenizer.vocab_size == model.config.vocab_size


def test_cli_checks_the_template_only_when_it_uses_it(template_file):
    path = template_file("{% for %}")
    base = [sys.executable, "-m", "mlx_llama", "generate", "-m", str(path), "-n", "2", "--temp", "0", "Hello"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tokenizer.chat_template: syntax error" in r.stderr, r.stderr
    for flags in (["--raw"], ["--chat-template", "chatml"]):
        r = subprocess.run(base + flags, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (flags, r.stderr)
