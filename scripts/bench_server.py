"""The server's acceptance figures, measured as a client sees them (issue 15).

    python scripts/bench_server.py [-m MODEL] [--tokens 96] [--clients 4 8] [--no-cache-check]

1. 1 streaming greedy client, then 4 at once (`--parallel 4`): each of the 4 answers equal to the
   same prompt's answer alone, and the aggregate generation tokens/s against one client's.
2. The same with 8 clients on a `--parallel 8` server.
3. A conversation's second turn: its `cached_tokens` against the first turn's prompt + answer
   tokens, and the time to first token of both turns.
4. A client that disconnects mid-stream: how long, and how many decode steps, until `/health`
   shows its slot free; then a new request.

Answers are made `--tokens` long by banning the end-of-generation tokens (logit bias -100), so
that every client generates the same number of tokens. Generation tokens/s: the tokens after the
first over the time after the first; aggregate: all clients' tokens over the wall time from the
first request sent to the last token received (their prompts' prefill included).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openai  # noqa: E402
from server_process import ServerProcess  # noqa: E402

PROMPTS = ["Tell me a story about a dragon.", "Explain how a bicycle works.", "Describe a walk in the forest.",
           "Write a letter to a friend.", "What makes a good breakfast?", "Describe the sea in winter.",
           "How do plants grow?", "Tell me about the history of Rome."]


class Client:
    def __init__(self, url: str):
        self.api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        self.model = self.api.models.list().data[0].id

    def stream(self, messages, **kw) -> dict:
        """One streamed chat answer: text, usage, send / first token / last token times."""
        sent = time.perf_counter()
        first = last = None
        parts, usage = [], None
        for chunk in self.api.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts), "usage": usage, "sent": sent, "first": first, "last": last}


def generation_tps(r: dict) -> float:
    return (r["usage"].completion_tokens - 1) / (r["last"] - r["first"])


def concurrent(client: Client, prompts: list[str], kw: dict) -> list[dict]:
    results = [None] * len(prompts)

    def run(i):
        results[i] = client.stream([{"role": "user", "content": prompts[i]}], **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def cli_tps(model: str, tokens: int, banned: dict) -> None:
    """`mlx_llama generate`'s generation tokens/s on the first prompt: the single-sequence loop."""
    bias = [a for t in banned for a in ("-l", f"{t}-inf")]
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", model, "--temp", "0", "-n", str(tokens),
                        *bias, PROMPTS[0]], capture_output=True, text=True, check=True)
    print("mlx_llama generate (no server, one sequence): " + re.search(r"generation: [^|]*", r.stderr).group(0))


def batching(model: str, n: int, tokens: int, banned: dict) -> None:
    server = ServerProcess("-m", model, "--parallel", str(n), "--ctx", "1024")
    try:
        client = Client(server.url)
        kw = dict(temperature=0, max_tokens=tokens, logit_bias=banned)
        client.stream([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)  # warm-up
        alone = [client.stream([{"role": "user", "content": p}], **kw) for p in PROMPTS[:n]]
        one = sum(generation_tps(r) for r in alone) / n
        together = concurrent(client, PROMPTS[:n], kw)
        equal = sum(a["text"] == b["text"] for a, b in zip(alone, together))
        total = sum(r["usage"].completion_tokens for r in together)
        wall = max(r["last"] for r in together) - min(r["sent"] for r in together)
        # generation alone, as for one client: the tokens after each first one, from the first
        # first token to the last token (the later prompts' prefills still fall inside)
        gen = sum(r["usage"].completion_tokens - 1 for r in together) / (
            max(r["last"] for r in together) - min(r["first"] for r in together))
        each = [generation_tps(r) for r in together]
        print(f"--parallel {n}: 1 client {one:.1f} tok/s (generation, mean of {n} prompts alone) | "
              f"{n} clients: aggregate generation {gen:.1f} tok/s ({gen / one:.2f}x one client); "
              f"{total} tokens in {wall:.1f}s wall, prefills included = {total / wall:.1f} tok/s ({total / wall / one:.2f}x); "
              f"each client {min(each):.1f}-{max(each):.1f} tok/s | answers equal to alone: {equal}/{n} | "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        server.stop()


def caching_and_disconnect(model: str) -> None:
    server = ServerProcess("-m", model, "--parallel", "4", "--ctx", "2048")
    try:
        client = Client(server.url)
        system = "You are a helpful assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(60))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
        t1 = client.stream(messages, temperature=0, max_tokens=64)
        messages += [{"role": "assistant", "content": t1["text"]}, {"role": "user", "content": "And of Germany?"}]
        t2 = client.stream(messages, temperature=0, max_tokens=64)
        u1, u2 = t1["usage"], t2["usage"]
        print(f"turn 1: {u1.prompt_tokens} prompt + {u1.completion_tokens} answer tokens, time to first token "
              f"{t1['first'] - t1['sent']:.3f}s | turn 2: {u2.prompt_tokens} prompt tokens, "
              f"cached_tokens {u2.prompt_tokens_details.cached_tokens} (turn 1's prompt + answer: "
              f"{u1.prompt_tokens + u1.completion_tokens}), time to first token {t2['first'] - t2['sent']:.3f}s")

        stream = client.api.chat.completions.create(model=client.model, stream=True, max_tokens=512, temperature=0,
                                                    messages=[{"role": "user", "content": "Tell me a long story."}])
        for n, _ in enumerate(stream):
            if n == 3:
                break
        before = server.health()
        closed = time.perf_counter()
        stream.close()
        health = server.health()
        while any(s["state"] != "idle" for s in health["slots"]):
            time.sleep(0.005)
            health = server.health()
        freed = time.perf_counter() - closed
        after = client.stream([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
        print(f"disconnect: slot free {freed * 1000:.0f} ms after the client closed, "
              f"{health['steps'] - before['steps']} decode step(s) later; next request served: "
              f"{after['usage'].completion_tokens} tokens")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--tokens", type=int, default=96, help="tokens each answer generates")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8], help="concurrent clients (and slots) to measure")
    ap.add_argument("--cache-check", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the second turn's cache and a disconnect (3., 4.)")
    args = ap.parse_args()
    import mlx_llama
    from mlx_llama.chat_template import stop_token_ids
    from mlx_llama.prompt import file_template
    from mlx_llama.tokenizer import Tokenizer
    from mlx_llama.gguf_file import GGUFFile

    model = args.model or str(mlx_llama.default_model())
    tokenizer = Tokenizer.from_gguf(GGUFFile(model))
    stops = tokenizer.stop_ids | stop_token_ids(file_template(tokenizer), tokenizer)
    banned = {str(t): -100 for t in stops}  # every answer runs to --tokens
    cli_tps(model, args.tokens, banned)
    for n in args.clients:
        if n > len(PROMPTS):
            ap.error(f"--clients: at most {len(PROMPTS)}")
        batching(model, n, args.tokens, banned)
    if args.cache_check:
        caching_and_disconnect(model)


if __name__ == "__main__":
    main()
