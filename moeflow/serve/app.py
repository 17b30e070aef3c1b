"""The HTTP application: OpenAI-compatible routes over the engine worker (Starlette, ASGI).

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events ending in
`data: [DONE]` with "stream": true), GET /v1/models, /v1/models/{id}, /health, /metrics.

Starlette rather than FastAPI: the bodies are parsed and validated by hand (protocol.py) so each
malformed input gets its own 400 naming the field; declarative body binding, FastAPI's main
feature, would be bypassed. Every error body has OpenAI's shape {"error": {message, type, param,
code}}, including 404/405 for unknown routes and 500 for a failure inside the server.

`Guard`, a plain ASGI middleware in front of everything, (1) refuses bodies over max_body_bytes
with 413 before anything parses them (by Content-Length when declared, else while reading),
(2) answers 503 to new work while the server drains, and (3) counts every response by endpoint
and status for /metrics.

A request's life: parse -> validate -> build_job (tokenize, check limits) -> try_admit (429 if
the bounded queue is full) -> submit to the engine thread -> events from the worker become text
(detokenized, cut at stop strings) -> one JSON body or an SSE chunk per event. A client that
goes away is noticed (the SSE response listens for http.disconnect; a non-streaming request
watches for it) and its sequences are aborted, which frees their cache in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moeflow.infer.text import TextStream
from moeflow.serve.config import ServeConfig
from moeflow.serve.loader import LoadedModel
from moeflow.serve.metrics import ServerMetrics
from moeflow.serve.protocol import (ChatRequest, CompletionRequest, Job, Limits, RequestError,
                                    build_job, parse_body, validate)
from moeflow.serve.worker import DISCONNECTED, EngineFailure, EngineWorker, JobHandle

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics")
ALWAYS_OPEN = ("/health", "/metrics")   # still answered while draining
CLIENT_CLOSED = 499  # counted (and answered, where anything is) when the client went away


@dataclass
class ServerState:
    """Everything the routes share; one per app (no module-level state)."""
    config: ServeConfig
    loaded: LoadedModel
    worker: EngineWorker
    model_name: str
    limits: Limits
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0      # generation requests not yet completely answered


def _error(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _send_error(scope, send, err: RequestError) -> None:
    await _error(err)(scope, None, send)


class Guard:
    """Body-size limit, drain refusal and per-status counting, before any parsing."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else (
            "/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": None}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if state.draining and path not in ALWAYS_OPEN:
                state.metrics.rejected.labels("draining").inc()
                return await _send_error(scope, counting_send, RequestError(
                    503, "server is shutting down and accepts no new requests",
                    code="draining"))
            body = await self._read_body(scope, receive, counting_send)
            if body is None:
                if status["code"] is None:  # no response: the client left before its body came
                    status["code"] = CLIENT_CLOSED
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            state.metrics.requests.labels(endpoint, status["code"] or 500).inc()

    async def _read_body(self, scope, receive, send) -> bytes | None:
        limit = self.state.config.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(scope, send, RequestError(
                    400, "Content-Length header is not an integer", "Content-Length"))
                return None
            if size > limit:
                await _send_error(scope, send, _too_large(size, limit))
                return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await _send_error(scope, send, _too_large(total, limit, at_least=True))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> RequestError:
    what = f"at least {size}" if at_least else str(size)
    return RequestError(413, f"body: {what} bytes exceeds the limit of {limit} bytes "
                             f"(--max-body-bytes)", "body", "body_too_large")


# ---- routes ---------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    return request.app.state.serve


async def health(request: Request) -> Response:
    state = _state(request)
    s = state.worker.stats
    body = {"status": "ok", "model": state.model_name, "running": s.running,
            "waiting": s.waiting, "cache_used": s.cache_used, "cache_capacity": s.cache_capacity,
            "admitted": state.worker.outstanding, "inflight": state.inflight}
    if state.draining:
        body["status"] = "draining"
    elif not state.worker.alive:
        body["status"] = "engine stopped"
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


async def metrics(request: Request) -> Response:
    state = _state(request)
    body, content_type = state.metrics.render(state.worker.stats, state.worker.outstanding,
                                              state.inflight, state.draining,
                                              request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "moeflow", "max_model_len": state.limits.max_seq_len}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["model"]
    if name != state.model_name:
        raise _unknown_model(name, state)
    return JSONResponse(_model_card(state))


def _unknown_model(name: str, state: ServerState) -> RequestError:
    return RequestError(404, f"model: {name!r} does not exist (this server serves "
                             f"{state.model_name!r})", "model", "model_not_found")


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatRequest)


async def _generate(request: Request, schema) -> Response:
    state = _state(request)
    start = time.perf_counter()
    req = validate(schema, parse_body(await request.body()))
    if req.model != state.model_name:
        raise _unknown_model(req.model, state)
    loaded = state.loaded
    job = build_job(req, state.limits, loaded.tokenizer, loaded.chat_template)
    if not state.worker.try_admit(job.num_sequences):
        state.metrics.rejected.labels("queue_full").inc()
        if not state.worker.alive:
            raise RequestError(503, "the engine is not running", code="engine_stopped")
        raise RequestError(429, f"server is at capacity ({state.worker.capacity} sequences "
                                f"running or queued); retry later", code="queue_full")
    kind = "chatcmpl" if job.chat else "cmpl"
    request_id = f"{kind}-{uuid.uuid4().hex}"
    prompts = [job.prompts[job.prompt_of(s)] for s in range(job.num_sequences)]
    groups = (None if job.groups is None else
              [job.groups[job.prompt_of(s)] for s in range(job.num_sequences)])
    try:
        handle = await state.worker.submit(prompts, list(job.params), request_id, groups)
    except ValueError as e:
        raise RequestError(400, str(e), None) from None
    try:
        run = _Run(state, job, handle, request_id, start)
    except BaseException:
        state.worker.abort(handle)
        raise
    state.inflight += 1
    if job.stream:
        return _SSE(run.sse(), on_close=run.close, media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await run.collect(request)
    finally:
        run.close()


class _SSE(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (done, error, disconnect)."""

    def __init__(self, *args, on_close, **kw) -> None:
        super().__init__(*args, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Run:
    """One admitted request: turns worker events into choices, text and usage."""

    def __init__(self, state: ServerState, job: Job, handle: JobHandle, request_id: str,
                 start: float) -> None:
        self.state, self.job, self.handle = state, job, handle
        self.id, self.start = request_id, start
        tok = state.loaded.tokenizer
        n = job.num_sequences
        prefix = state.loaded.chat_template.reply_prefix if job.chat else ""
        self.streams = [TextStream(tok, job.stop, drop_prefix=prefix) for _ in range(n)]
        self.texts = [""] * n
        self.tokens = [0] * n
        self.reasons: list[str | None] = [None] * n
        self.failure: str | None = None
        self.first_token_at: float | None = None
        self.created = int(time.time())
        self.closed = False

    @property
    def done(self) -> bool:
        return self.failure is not None or all(r is not None for r in self.reasons)

    def apply(self, i: int, event) -> str:
        """Text delta for choice i; sets its finish reason when it ends."""
        if self.reasons[i] is not None:
            return ""
        if isinstance(event, EngineFailure):
            self.failure = event.message
            return ""
        delta = ""
        if event.token_id is not None:
            self.tokens[i] += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            eos = (event.finished and event.finish_reason == "stop"
                   and event.token_id in self.job.params[i].stop_token_ids)
            if not eos:
                delta = self.streams[i].push(event.token_id)
        if self.streams[i].stopped:
            self.reasons[i] = "stop"
            self.state.worker.abort(self.handle, [i])
        elif event.finished:
            delta += self.streams[i].finish()
            self.reasons[i] = event.finish_reason or "stop"
        self.texts[i] += delta
        return delta

    def close(self, disconnected: bool = False) -> None:
        """Abort what is still running and record metrics, exactly once."""
        if self.closed:
            return
        self.closed = True
        state, m = self.state, self.state.metrics
        state.inflight -= 1
        if not self.handle.done:
            state.worker.abort(self.handle)
        if disconnected or (not self.done and self.failure is None):
            m.disconnects.inc()
        for r in self.reasons:
            m.finished.labels(r or ("error" if self.failure else "abort")).inc()
        m.prompt_tokens.inc(sum(map(len, self.job.prompts)))
        m.generation_tokens.inc(sum(self.tokens))
        now = time.perf_counter()
        m.latency.observe(now - self.start)
        if self.first_token_at is not None:
            m.ttft.observe(self.first_token_at - self.start)

    def usage(self) -> dict:
        prompt = sum(map(len, self.job.prompts))
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _echo(self, i: int) -> str:
        return self.job.prompt_texts[self.job.prompt_of(i)] if self.job.echo else ""

    # ---- one JSON body --------------------------------------------------------------------
    async def collect(self, request: Request) -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request, self.handle))
        try:
            while not self.done:
                item = await self.handle.events.get()
                if item is DISCONNECTED:
                    self.close(disconnected=True)
                    return Response(status_code=CLIENT_CLOSED)
                self.apply(*item)
        finally:
            watcher.cancel()
        if self.failure is not None:
            return _error(RequestError(500, f"generation failed: {self.failure}",
                                       code="engine_error"))
        if self.job.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": self.reasons[i]}
                       for i, t in enumerate(self.texts)]
        else:
            choices = [{"index": i, "text": self._echo(i) + t, "logprobs": None,
                        "finish_reason": self.reasons[i]} for i, t in enumerate(self.texts)]
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.job.chat
                             else "text_completion", "created": self.created,
                             "model": self.state.model_name, "choices": choices,
                             "usage": self.usage()})

    # ---- server-sent events ---------------------------------------------------------------
    def _chunk(self, i: int | None, delta: str | None, reason: str | None = None,
               role: bool = False) -> str:
        chat = self.job.chat
        obj = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": self.created, "model": self.state.model_name, "choices": []}
        if i is not None:
            if chat:
                d = {"role": "assistant", "content": ""} if role else (
                    {"content": delta} if delta else {})
                choice = {"index": i, "delta": d}
            else:
                choice = {"index": i, "text": delta or ""}
            choice.update(logprobs=None, finish_reason=reason)
            obj["choices"].append(choice)
        else:
            obj["usage"] = self.usage()
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def sse(self):
        n = self.job.num_sequences
        for i in range(n):
            if self.job.chat:
                yield self._chunk(i, None, role=True)
            elif self.job.echo:
                yield self._chunk(i, self._echo(i))
        events = self.handle.events
        while not self.done:
            # Everything already queued goes out together: one chunk per choice, so a slow
            # client or a busy loop gets fewer, larger chunks instead of falling behind.
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            deltas: dict[int, str] = {}
            ended: dict[int, str] = {}
            for i, event in batch:
                had_reason = self.reasons[i] is not None
                deltas[i] = deltas.get(i, "") + self.apply(i, event)
                if not had_reason and self.reasons[i] is not None:
                    ended[i] = self.reasons[i]
            if self.failure is not None:
                err = RequestError(500, f"generation failed: {self.failure}", code="engine_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            for i, delta in deltas.items():
                if delta or i in ended:
                    yield self._chunk(i, delta, ended.get(i))
        if self.job.include_usage and self.failure is None:
            yield self._chunk(None, None)
        yield "data: [DONE]\n\n"


async def _watch_disconnect(request: Request, handle: JobHandle) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.events.put_nowait(DISCONNECTED)
            return


# ---- error pages ----------------------------------------------------------------------------
async def _request_error(request: Request, exc: RequestError) -> Response:
    return _error(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(RequestError(exc.status_code, f"{request.method} {request.url.path}: "
                                                f"{exc.detail}", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(RequestError(500, f"internal server error: {type(exc).__name__}",
                               code="internal_error"))


def create_app(state: ServerState) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        RequestError: _request_error, HTTPException: _http_error, Exception: _server_error})
    app.router.redirect_slashes = False  # "/v1/completions/" is an unknown route: a JSON 404
    app.state.serve = state
    app.add_middleware(Guard, state=state)
    return app
