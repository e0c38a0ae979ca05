"""`mlx_llama serve`: an OpenAI-compatible HTTP server, in three layers.

- `schema`: OpenAI's request and response JSON (pydantic models), errors as OpenAI's error JSON;
- `app`: the HTTP side (Starlette): routes, API key, body limit, server-sent events, the chat page;
- `scheduler`: the slots and the one decode loop that batches them, prompt caching; no HTTP.

The scheduler runs `batch.Batch` and `batch.Sequence` of the generation layer, the same
prefill, sampler and stop rules as `mlx_llama generate`.
"""
