"""`mlx_llama serve` as a user meets it: a real server process on a free port, spoken to over
HTTP by the official `openai` client (and by plain HTTP for what the client will not send).

One server for the module (SmolLM2, 4 slots, an API key); answers are kept short.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")

from server_fixtures import KEY, server_fixtures  # noqa: E402

CTX = 1024
MAX_TOKENS = 256

server, client, model_id = server_fixtures("--parallel", "4", "--ctx", str(CTX), "--max-tokens", str(MAX_TOKENS))


def post(server, path: str, body: bytes | str | dict, key: str | None = KEY, method: str = "POST"):
    """(status, parsed JSON) of a raw HTTP request."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    data = json.dumps(body) if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw)


def stream_chat(client, model_id, messages, **kw):
    """(text, usage, finish_reason, seconds to the first content) of a streamed chat answer."""
    t0 = time.perf_counter()
    first = None
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter() - t0
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(parts), usage, finish, first


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the API ------------------------------------------------------------------------------------


def test_models_and_health(server, client, model_id, smollm2_path):
    assert model_id == smollm2_path.name.removesuffix(".gguf")
    assert client.models.retrieve(model_id).id == model_id
    health = server.health()
    assert health["status"] == "ok" and len(health["slots"]) == 4 and health["context"] == CTX


def test_chat_greedy_equals_generate(client, model_id, smollm2_path):
    prompt = "What is the capital of France?"
    r = client.chat.completions.create(model=model_id, messages=user(prompt), temperature=0, max_tokens=24)
    cli = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", str(smollm2_path), "--temp", "0",
                          "-n", "24", prompt], capture_output=True, text=True, timeout=300)
    assert r.choices[0].message.content == cli.stdout.removesuffix("\n")
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens > 20  # the template's system message and markers are counted


def test_completion_raw_prompt(client, model_id):
    r = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0, max_tokens=6)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 5


@pytest.fixture(scope="module")
def counting(client, model_id) -> str:
    """The greedy completion of "1, 2, 3," (12 tokens, not streamed)."""
    r = client.completions.create(model=model_id, prompt="1, 2, 3,", temperature=0, max_tokens=12)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    return r.choices[0].text


def test_streaming_equals_whole_answer(client, model_id, counting):
    messages = user("Name three colors.")
    whole = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=8)
    text, usage, finish, _ = stream_chat(client, model_id, messages, temperature=0, max_tokens=8)
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    pieces = [c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="1, 2, 3,", temperature=0, max_tokens=12, stream=True) if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed, not one piece
    assert "".join(pieces) == counting


def test_stop_strings(client, model_id, counting):
    assert " 5," in counting
    r = client.completions.create(model=model_id, prompt="1, 2, 3,", temperature=0, max_tokens=12, stop=[" 5,"])
    assert r.choices[0].text == counting[: counting.index(" 5,")] and r.choices[0].finish_reason == "stop"


def test_seeds_and_sampling_fields(client, model_id, smol_tokenizer):
    ask = dict(model=model_id, prompt="My favourite animal is", max_tokens=4, temperature=1.0, top_p=1.0,
               extra_body={"top_k": 0, "min_p": 0.0})  # llama.cpp's fields, outside OpenAI's schema
    a, b = (client.completions.create(seed=7, **ask).choices[0].text for _ in range(2))
    others = {client.completions.create(seed=s, **ask).choices[0].text for s in (8, 9)}
    assert a == b and (others - {a})  # the same seed draws the same tokens; other seeds others
    # a bias of +100 makes a token the only choice; penalties are accepted
    cat = smol_tokenizer.encode(" cat", add_special=False, parse_special=False)
    assert len(cat) == 1
    forced = client.completions.create(model=model_id, prompt="1, 2, 3,", temperature=0, max_tokens=3,
                                       logit_bias={str(cat[0]): 100}).choices[0].text
    assert forced == " cat" * 3
    r = client.completions.create(model=model_id, prompt="1, 2, 3,", temperature=0, max_tokens=4, presence_penalty=1.5,
                                  frequency_penalty=0.5, extra_body={"repeat_penalty": 1.3})
    assert r.usage.completion_tokens >= 1


# ---- batching, caching, disconnects -----------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
             "Why is the sky blue?"]


def test_concurrent_clients_equal_single(server, client, model_id):
    """4 streaming clients at once: each gets its single-client answer, in shared decode steps."""
    alone = [stream_chat(client, model_id, user(q), temperature=0, max_tokens=8)[0] for q in QUESTIONS]
    results: dict[int, str] = {}
    steps = server.health()["steps"]

    def run(i):
        results[i] = stream_chat(client, model_id, user(QUESTIONS[i]), temperature=0, max_tokens=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results[i][0] for i in range(4)] == alone
    generated = sum(results[i][1].completion_tokens for i in range(4))
    # one after another would take a step per token; batched, the 4 share steps
    assert server.health()["steps"] - steps < 0.6 * generated


def test_second_turn_reuses_the_cache(client, model_id):
    system = "You are a helpful assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(36))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
    text1, usage1, finish1, ttft1 = stream_chat(client, model_id, messages, temperature=0, max_tokens=32)
    assert finish1 == "stop" and usage1.prompt_tokens > 350
    messages += [{"role": "assistant", "content": text1}, {"role": "user", "content": "And of Germany?"}]
    text2, usage2, _, ttft2 = stream_chat(client, model_id, messages, temperature=0, max_tokens=32)
    assert usage2.prompt_tokens_details.cached_tokens == usage1.prompt_tokens + usage1.completion_tokens
    assert ttft2 < ttft1


def test_disconnect_frees_the_slot(server, client, model_id):
    stream = client.chat.completions.create(model=model_id, messages=user("Tell me a long story about a dragon."),
                                            stream=True, temperature=0, max_tokens=MAX_TOKENS)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    busy = server.health()
    assert [s["state"] for s in busy["slots"]].count("decode") == 1
    stream.close()  # the connection goes
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if all(s["state"] == "idle" for s in health["slots"]):
            break
        time.sleep(0.02)
    # freed at the step after the one that ran when the client left
    assert all(s["state"] == "idle" for s in health["slots"]) and health["steps"] - busy["steps"] <= 3
    r = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0, max_tokens=2)
    assert r.usage.completion_tokens == 2


# ---- errors -----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
GOOD = {"model": None, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def bad_requests(model_id: str) -> list[tuple[str, str, object, int, str]]:
    """(what, path, body, status, a word of the message) for the mistakes a client can make."""
    good = dict(GOOD, model=model_id)
    return [
        ("malformed JSON", CHAT, '{"model": "x", "messages": [', 400, "not valid JSON"),
        ("NaN in JSON", CHAT, json.dumps(good)[:-1] + ', "temperature": NaN}', 400, "not valid JSON"),
        ("not an object", CHAT, "[1, 2]", 400, "JSON object"),
        ("unknown model", CHAT, dict(good, model="gpt-4o"), 400, "unknown model"),
        ("no messages", CHAT, {"model": model_id}, 400, "messages"),
        ("empty messages", CHAT, dict(good, messages=[]), 400, "messages"),
        ("unknown role", CHAT, dict(good, messages=[{"role": "robot", "content": "x"}]), 400, "role"),
        ("image content", CHAT, dict(good, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "content"),
        ("temperature too high", CHAT, dict(good, temperature=5), 400, "temperature"),
        ("temperature as text", CHAT, dict(good, temperature="hot"), 400, "temperature"),
        ("top_p above 1", CHAT, dict(good, top_p=1.5), 400, "top_p"),
        ("max_tokens 0", CHAT, dict(good, max_tokens=0), 400, "max_tokens"),
        ("max_tokens over the limit", CHAT, dict(good, max_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
        ("max_tokens fractional", CHAT, dict(good, max_tokens=2.5), 400, "max_tokens"),
        ("logit_bias key", CHAT, dict(good, logit_bias={"cat": 1}), 400, "logit_bias"),
        ("logit_bias outside the vocabulary", CHAT, dict(good, logit_bias={"99999999": 1}), 400, "vocabulary"),
        ("n > 1", CHAT, dict(good, n=2), 400, "n"),
        ("too many stop strings", CHAT, dict(good, stop=["x"] * 17), 400, "stop"),
        ("prompt over the context", "/v1/completions", {"model": model_id, "prompt": "hello " * (CTX + 10)}, 400, "context"),
        ("empty prompt", "/v1/completions", {"model": model_id, "prompt": ""}, 400, "empty"),
        ("token id outside the vocabulary", "/v1/completions", {"model": model_id, "prompt": [1, 10**9]}, 400, "vocabulary"),
        ("body too large", CHAT, dict(good, pad="x" * (1 << 20)), 413, "larger than"),
        ("unknown path", "/v1/embeddings", good, 404, "unknown path"),
    ]


def test_bad_requests_are_one_line_openai_errors(server, client, model_id):
    cases = bad_requests(model_id)
    assert len(cases) >= 10
    for what, path, body, status, word in cases:
        got, answer = post(server, path, body)
        assert got == status, (what, answer)
        error = answer["error"]
        assert word in error["message"] and "\n" not in error["message"], (what, error)
        assert error["type"] in ("invalid_request_error", "server_error") and "Traceback" not in error["message"]
    got, answer = post(server, CHAT, "", method="GET")
    assert got == 405 and "not allowed" in answer["error"]["message"]
    # the server goes on serving
    r = client.chat.completions.create(model=model_id, messages=user("Hi"), max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_openai_client_raises_bad_request(client, model_id):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model_id, messages=user("Hi"), temperature=3)


def test_api_key(server, model_id):
    good = dict(GOOD, model=model_id)
    for key in (None, "wrong-key"):
        status, answer = post(server, CHAT, good, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.health()["status"] == "ok"  # /health and the page need no key
    status, _ = post(server, CHAT, good)
    assert status == 200


def test_command_line_errors_are_one_line(server, tmp_path):
    port = urlparse(server.url).port
    bad_file = tmp_path / "bad.gguf"
    bad_file.write_bytes(b"not a gguf file")
    for args, word in ((["--port", str(port)], "cannot listen"), (["--port", "0", "-m", str(bad_file)], "bad.gguf"),
                       (["--parallel", "0"], "parallel")):
        r = subprocess.run([sys.executable, "-m", "mlx_llama", "serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and word in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mlx_llama: error:"), r.stderr
