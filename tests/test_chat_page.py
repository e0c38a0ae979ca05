"""The chat page at / in a real browser: Debian's Chromium, headless, driven by Playwright.

A user types a question, sees the answer stream in, and asks a follow-up; the follow-up's
request carries the conversation so far, and the server reuses its cache for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

from server_process import ServerProcess  # noqa: E402

SCREENSHOT = os.environ.get("MLX_LLAMA_CHAT_SCREENSHOT")  # a PNG path, to look at the page
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc = ServerProcess("-m", str(smollm2_path), "--parallel", "2", "--ctx", "1024")
    yield proc
    log = proc.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure, not a skip
            pytest.fail("Chromium is missing: apt-get install chromium")
        pytest.skip("needs Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_chat_page_streams_and_keeps_the_conversation(server, browser):
    page = browser.new_page()
    outside = []  # the page must load nothing but what the server serves
    page.on("request", lambda r: None if r.url.startswith(server.url) else outside.append(r.url))
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text(re.compile("SmolLM2"))
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("24")

    page.locator("#input").fill("What is the capital of France?")
    page.locator("#input").press("Enter")
    first = page.locator(".msg.assistant").nth(0)
    # streamed: text shows while the answer is still coming
    page.wait_for_function("() => { const a = document.querySelector('.msg.assistant');"
                           " return a && a.textContent.length > 0 && !a.dataset.done; }", polling=20, timeout=120_000)
    sync_api.expect(first).to_have_attribute("data-done", "true", timeout=120_000)
    assert "Paris" in first.text_content()
    assert "error" not in (first.get_attribute("class") or "")

    page.locator("#input").fill("And of Germany?")  # means nothing without the first question
    page.locator("#send").click()
    second = page.locator(".msg.assistant").nth(1)
    sync_api.expect(second).to_have_attribute("data-done", "true", timeout=120_000)
    assert "Berlin" in second.text_content()
    # the follow-up sent the whole conversation, and the server prefilled only the new turn
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == first.text_content()
    stats = page.locator(".stats").nth(1).text_content()
    prompt = int(re.search(r"(\d+) prompt tokens", page.locator(".stats").nth(0).text_content()).group(1))
    cached = int(re.search(r"\((\d+) cached\)", stats).group(1))
    assert cached > prompt, stats
    assert outside == []
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
    page.close()
