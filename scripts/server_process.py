"""A real `mlx_llama serve` process (for the tests and `bench_server.py`), on a port the OS picks.

The server is started with `--port 0`; the port is read from the line it prints once it
listens. `ServerProcess.stop()` ends it (SIGINT, as Ctrl-C) and returns what it printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout


class ServerProcess:
    def __init__(self, *args: str, command: list[str] | None = None, timeout: float = 120):
        cmd = command or [sys.executable, "-m", "mlx_llama", "serve"]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([*cmd, "--port", "0", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self.url = self._wait_for_url(timeout)
        threading.Thread(target=self._drain, daemon=True).start()  # keep reading, so the pipe never fills
        self._wait_healthy(timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"the server exited ({self.proc.wait()}):\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"on (http://\S+) ", line)
            if m:
                return m.group(1)
        raise RuntimeError("the server did not say where it listens:\n" + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server never answered /health")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.load(r)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.1)  # the drain thread reads the last lines
        return "".join(self.lines)
