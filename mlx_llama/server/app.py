"""The HTTP layer: Starlette routes for OpenAI's endpoints, the chat page and /health.

A request is checked here (key, size, JSON, fields), turned into token ids and a constraint by
`prepare.py` and handed to the scheduler as a `Job`; the scheduler's events come back
through an asyncio queue and go out as one JSON body or as server-sent events (an answer with
tools is sent whole at its end, its calls parsed out: the text is the call). Everything a
client can get wrong is answered with OpenAI's error JSON, one line of message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from importlib import resources

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..tools import ToolFormat
from . import prepare
from .scheduler import Busy, Failed, Finished, Job, Piece, Scheduler
from .schema import ChatRequest, CompletionRequest, Reply, RequestError, parse_body


@dataclass
class Settings:
    model_id: str
    template: object | None  # the chat template, None when the model has none
    api_key: str | None = None
    max_tokens: int = 2048  # a request's default and its upper bound
    max_body: int = 1 << 20  # bytes


def error_response(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Server:
    """The routes' shared state: the scheduler, the tokenizer and the settings."""

    def __init__(self, scheduler: Scheduler, tokenizer, settings: Settings):
        self.scheduler, self.tokenizer, self.settings = scheduler, tokenizer, settings

    # ---- checks -----------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError("invalid or missing API key: send 'Authorization: Bearer KEY'", 401,
                               code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused once it passes `max_body` bytes (whatever Content-Length says)."""
        limit = self.settings.max_body
        too_big = RequestError(f"the request body is larger than {limit} bytes", 413, code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def check_model(self, name: str) -> None:
        if name != self.settings.model_id:
            raise RequestError(f"unknown model {name!r}: this server serves {self.settings.model_id!r}",
                               param="model", code="model_not_found")

    # ---- a request → a job ------------------------------------------------------------------

    def make_job(self, req, build) -> tuple[Job, ToolFormat | None]:
        """Check a request and make its job; `build()` gives its prompt and constraint
        (`prepare.py`). In a worker thread: a long prompt takes a while to tokenize."""
        vocab = self.scheduler.model.config.vocab_size
        params = req.sampling(vocab)
        limit = req.limit()
        if limit is not None and limit > self.settings.max_tokens:
            raise RequestError(f"max_tokens is {limit}, more than this server's limit of {self.settings.max_tokens}",
                               param="max_tokens", code="invalid_value")
        prepared = build()
        ids, context = prepared.prompt.ids, self.scheduler.context
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param="prompt", code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < vocab), None)  # token ids given as such
        if bad is not None:
            raise RequestError(f"token {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt",
                               code="invalid_value")
        if len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the context of {context}",
                               code="context_length_exceeded")
        job = Job(ids, params, limit or self.settings.max_tokens, prepared.prompt.stop_ids, tuple(req.stop or ()),
                  matcher=prepare.matcher(prepared, self.tokenizer, vocab))
        return job, prepared.tools

    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        req = parse_body(await self.read_body(request), ChatRequest)
        self.check_model(req.model)
        template = self.settings.template
        if template is None:
            raise RequestError("the model has no chat template: use /v1/completions, or start the server "
                               "with --chat-template NAME", code="no_chat_template")
        job, tools = await anyio.to_thread.run_sync(self.make_job, req,
                                                    lambda: prepare.chat(self.tokenizer, template, req))
        return await self.run(request, job, req, Reply(True, self.settings.model_id, tools))

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        req = parse_body(await self.read_body(request), CompletionRequest)
        self.check_model(req.model)
        job, _ = await anyio.to_thread.run_sync(self.make_job, req, lambda: prepare.completion(self.tokenizer, req))
        return await self.run(request, job, req, Reply(False, self.settings.model_id))

    # ---- a job → a response -----------------------------------------------------------------

    async def run(self, request: Request, job: Job, req, reply: Reply) -> Response:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):  # from the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                self.scheduler.cancel(job)

        job.emit = emit
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise RequestError(str(e), 503, code="server_busy", kind="server_error") from None
        stream = EventStream(self.scheduler, job, events, reply, req)
        first = await until_disconnected(request.receive, events.get)
        if first is None:  # the client left while the request waited
            self.scheduler.cancel(job)
            return Response(status_code=499)
        if isinstance(first, Failed):
            raise RequestError(first.message)
        if req.stream:
            return stream
        text = await until_disconnected(request.receive, stream.collect)
        if text is None:
            self.scheduler.cancel(job)
            return Response(status_code=499)
        return JSONResponse(reply.body(*text))

    # ---- the other routes -------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "mlx_llama"}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, **self.scheduler.status()})

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8"))


async def until_disconnected(receive, work):
    """`await work()`, or None as soon as the client disconnects."""
    result = error = None
    async with anyio.create_task_group() as tg:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as e:  # raised after the group, not wrapped in an ExceptionGroup
            error = e
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


class EventStream(Response):
    """A job's events as server-sent events (`data: {chunk}`, then `data: [DONE]`); the job is
    cancelled as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, scheduler: Scheduler, job: Job, events: asyncio.Queue, reply: Reply, req):
        super().__init__(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # it streams
        self.scheduler, self.job, self.events, self.reply = scheduler, job, events, reply
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def collect(self) -> tuple[str, Finished]:
        """The whole text and the final event (a non-streaming response)."""
        parts = []
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return "".join(parts), event
            elif isinstance(event, Failed):
                raise RequestError(event.message, 500, kind="server_error")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await until_disconnected(receive, lambda: self.send_events(send))
        except OSError:  # the connection broke while sending
            pass
        finally:
            self.scheduler.cancel(self.job)

    async def send_events(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def data(obj) -> None:
            text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        if self.reply.chat:
            await data(self.reply.chunk(role=True))
        held = []  # with tools: the whole answer, parsed at its end
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                if self.reply.tools is None:
                    await data(self.reply.chunk(event.text))
                else:
                    held.append(event.text)
            elif isinstance(event, Finished):
                finish_reason = event.finish_reason
                if self.reply.tools is not None:
                    message, finish_reason = self.reply.message("".join(held), event)
                    await data(self.reply.message_chunk(message))
                await data(self.reply.chunk(finish_reason=finish_reason))
                if self.include_usage:
                    await data(self.reply.usage_chunk(event))
                break
            elif isinstance(event, Failed):  # the status is sent: the error goes in the stream
                await data(RequestError(event.message, 500, kind="server_error").body())
                break
        await data("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(scheduler: Scheduler, tokenizer, settings: Settings) -> Starlette:
    server = Server(scheduler, tokenizer, settings)

    async def request_error(request: Request, e: RequestError) -> Response:
        return error_response(e)

    async def http_error(request: Request, e: HTTPException) -> Response:
        messages = {404: f"unknown path {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(RequestError(messages.get(e.status_code, e.detail), e.status_code))

    async def internal_error(request: Request, e: Exception) -> Response:  # uvicorn logs the traceback
        return error_response(RequestError(f"internal error: {type(e).__name__}", 500, kind="server_error"))

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={RequestError: request_error, HTTPException: http_error,
                                                         Exception: internal_error})
