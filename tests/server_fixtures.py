"""The module-scoped fixtures the server tests share: a real `mlx_llama serve` process on
SmolLM2 with an API key, the official `openai` client for it, and the model id it reports."""

from __future__ import annotations

import pytest

from server_process import ServerProcess

KEY = "test-key"


def server_fixtures(*args: str):
    """(server, client, model_id) fixtures for a server started with `args` (and -m, --api-key);
    a test module binds them to those names."""

    @pytest.fixture(scope="module")
    def server(smollm2_path):
        proc = ServerProcess("-m", str(smollm2_path), *args, "--api-key", KEY)
        yield proc
        log = proc.stop()
        assert "Traceback" not in log, log

    @pytest.fixture(scope="module")
    def client(server):
        import openai

        return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    @pytest.fixture(scope="module")
    def model_id(client):
        return client.models.list().data[0].id

    return server, client, model_id
