"""An OpenAI-compatible HTTP endpoint over any session source: local parts, a streamed model, a
pipeline of nodes. Starlette + uvicorn (the ``api`` extra)::

    from llm_partial_run.api import create_app, serve_api
    from llm_partial_run.session import LocalModel

    serve_api(LocalModel("smollm2-sepweight"), port=8000)      # blocks; or:
    app = create_app(LocalModel("smollm2-sepweight"))           # any ASGI server

Routes: ``POST /v1/chat/completions`` (the model's chat template), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``. ``stream: true`` answers with server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``. Requests in flight are decoded together as
one batch (:mod:`llm_partial_run.batcher`). Bad requests get OpenAI-shaped JSON errors (4xx)
before anything reaches the model; a client that disconnects stops its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .api_requests import (
    ApiError,
    chat_messages,
    check_key,
    check_model,
    completion_prompts,
    generation_settings,
    get_field,
    read_json_body,
)
from .batcher import Batcher, BusyError, Event, Job
from .errors import PartialRunError
from .text import ChatTemplateError, Tokenizer

log = logging.getLogger(__name__)
access_log = logging.getLogger(__name__ + ".access")

DEFAULT_CONTEXT = 2048
"""Cache positions per request when neither the caller nor the model says otherwise."""


class Model:
    """What the HTTP layer serves: a tokenizer, the batcher, a name and a context length."""

    def __init__(self, name: str, tokenizer: Tokenizer, batcher: Batcher, context_len: int) -> None:
        self.name, self.tokenizer, self.batcher = name, tokenizer, batcher
        self.context_len = context_len
        self.max_rows = batcher.max_rows
        self.created = int(time.time())
        self.stop_token_ids = tuple(tokenizer.eos_token_ids)


def create_app(
    source: Any,
    tokenizer: Tokenizer | None = None,
    *,
    model_name: str | None = None,
    context_len: int | None = None,
    max_concurrency: int = 8,
    max_queue: int | None = None,
    api_key: str | None = None,
    idle_close_s: float = 1.0,
    gather_s: float = 0.005,
) -> Any:
    """A Starlette app answering the OpenAI API over ``source``.

    Args:
        source: anything with ``session(batch_size, max_len)`` (``Pipeline``, ``LocalModel``).
        tokenizer: default: built from ``source.tokenizer_files()`` (the model directory's, or
            fetched from a node).
        model_name: the id ``/v1/models`` lists and requests must name; default the model
            directory's name (a node reports it), else ``"model"``.
        context_len: prompt + completion tokens per request, at most; the batch session holds
            ``max_concurrency`` rows of this many positions. Default: the model's
            ``max_position_embeddings`` when known, capped at 2048.
        max_concurrency: rows decoded together (a request with ``n`` choices takes ``n``).
        max_queue: rows that may wait beyond those (default ``max_concurrency``); more get 429.
        api_key: when set, requests must send ``Authorization: Bearer <api_key>`` (else 401).
        idle_close_s: seconds the batch session stays open with no request before its cache
            is freed.
        gather_s: a request finding the model idle waits this long for others arriving with
            it, so they are prefilled and decoded together (0: none).
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    tokenizer = tokenizer or _tokenizer_of(source)
    context = _context_len(source, context_len)
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    batcher = Batcher(
        source, tokenizer, max_rows=max_concurrency, max_len=context,
        max_waiting=max_concurrency if max_queue is None else max_queue, pad_token_id=pad,
        idle_close_s=idle_close_s, gather_s=gather_s,
    )  # fmt: skip
    model = Model(model_name or _model_name(source), tokenizer, batcher, context)
    key = None if api_key is None else api_key.encode()

    def guarded(handler: Callable) -> Callable:
        async def endpoint(request: Any) -> Any:
            try:
                check_key(request, key)
                return await handler(request, model)
            except ApiError as exc:
                return _error_response(exc)

        return endpoint

    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    routes = [
        Route("/v1/chat/completions", guarded(_chat), methods=["POST"]),
        Route("/v1/completions", guarded(_completions), methods=["POST"]),
        Route("/v1/models", guarded(_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", guarded(_model), methods=["GET"]),
        Route("/health", guarded(_health), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=_contextmanager(lifespan),
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.model = model
    return _AccessLog(app)


# ---- endpoints -------------------------------------------------------------------------------


async def _chat(request: Any, model: Model) -> Any:
    body = await read_json_body(request)
    check_model(body, model)
    messages = chat_messages(body.get("messages"))
    try:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    prompt = model.tokenizer.encode(text, add_special_tokens=False)
    return await _generate(request, model, body, [prompt], chat=True)


async def _completions(request: Any, model: Model) -> Any:
    body = await read_json_body(request)
    check_model(body, model)
    prompts = completion_prompts(body.get("prompt"), model.tokenizer)
    return await _generate(request, model, body, prompts, chat=False)


async def _models(request: Any, model: Model) -> Any:
    return _json({"object": "list", "data": [_model_card(model)]})


async def _model(request: Any, model: Model) -> Any:
    check_model({"model": request.path_params["model_id"]}, model)
    return _json(_model_card(model))


async def _health(request: Any, model: Model) -> Any:
    return _json({"status": "ok", "model": model.name, **model.batcher.stats()})


def _model_card(model: Model) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created,
            "owned_by": "llm_partial_run", "context_length": model.context_len}  # fmt: skip


async def _generate(
    request: Any, model: Model, body: dict, prompts: list[list[int]], *, chat: bool
) -> Any:
    settings, n = generation_settings(body, model, prompts, chat=chat)
    stream = get_field(body, "stream", bool, False)
    options = get_field(body, "stream_options", dict, None) or {}
    include_usage = bool(options.get("include_usage")) if stream else False
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(prompts, settings, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), n=n)
    try:
        model.batcher.submit(job)
    except BusyError as exc:
        raise ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from exc
    except PartialRunError as exc:
        raise ApiError(503, str(exc), type="server_error") from exc
    reply = _Reply(model, job, events, chat=chat, prompt_tokens=sum(map(len, prompts)))
    request.scope["llm_usage"] = reply.usage
    if stream:
        return _EventStream(reply.chunks(include_usage), job)
    try:
        result = await _unless_disconnected(request, reply.collect(), job)
    except ApiError:
        raise
    except Exception as exc:  # the model failed (a node died, ...): the job's error event
        raise ApiError(500, f"generation failed: {exc}", type="server_error") from exc
    return _json(result)


class _Reply:
    """Turns a job's events into OpenAI's response objects (whole, or as chunks)."""

    def __init__(
        self, model: Model, job: Job, events: asyncio.Queue, *, chat: bool, prompt_tokens: int
    ) -> None:
        self.model, self.job, self.events, self.chat = model, job, events, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = len(job.prompts) * job.n
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": 0}
        self._tokens = [0] * self.choices

    async def events_until_done(self) -> AsyncIterator[Event]:
        """The job's events until every choice finished; raises the job's failure."""
        left = self.choices
        while left:
            event = await self.events.get()
            if isinstance(event, BaseException):
                raise event
            self._tokens[event.index] = event.tokens
            self.usage["completion_tokens"] = sum(self._tokens)
            self.usage["total_tokens"] = self.usage["prompt_tokens"] + sum(self._tokens)
            left -= event.finish_reason is not None
            yield event

    async def collect(self) -> dict[str, Any]:
        """The whole (non-streamed) response object."""
        texts = [[] for _ in range(self.choices)]
        reasons: list[str | None] = [None] * self.choices
        async for event in self.events_until_done():
            texts[event.index].append(event.text)
            reasons[event.index] = event.finish_reason or reasons[event.index]
        choices = []
        for i in range(self.choices):
            text = "".join(texts[i])
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {
                "text": text}  # fmt: skip
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": reasons[i]})
        return {**self._head(self.chat and "chat.completion" or "text_completion"),
                "choices": choices, "usage": dict(self.usage)}  # fmt: skip

    async def chunks(self, include_usage: bool) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed response, ``[DONE]`` last."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            for i in range(self.choices):
                yield _sse({**self._head(kind), "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}]})  # fmt: skip
        try:
            async for event in self.events_until_done():
                if event.text or event.finish_reason:
                    yield _sse({**self._head(kind), "choices": [self._delta(event)]})
        except Exception as exc:  # the model failed: the client's stream raises APIError
            error = ApiError(500, f"generation failed: {exc}", type="server_error")
            yield _sse(error.body())
            yield b"data: [DONE]\n\n"
            return
        if include_usage:
            yield _sse({**self._head(kind), "choices": [], "usage": dict(self.usage)})
        yield b"data: [DONE]\n\n"

    def _delta(self, event: Event) -> dict[str, Any]:
        if self.chat:
            delta = {"content": event.text} if event.text else {}
            return {"index": event.index, "delta": delta, "logprobs": None,
                    "finish_reason": event.finish_reason}  # fmt: skip
        return {"index": event.index, "text": event.text, "logprobs": None,
                "finish_reason": event.finish_reason}  # fmt: skip

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.model.name, "system_fingerprint": None}  # fmt: skip


# ---- responses, streaming, disconnects, access log ---------------------------------------------


def _json(data: dict[str, Any], status: int = 200) -> Any:
    from starlette.responses import Response

    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json")


def _error_response(exc: ApiError) -> Any:
    return _json(exc.body(), exc.status)


async def _http_error(request: Any, exc: Any) -> Any:
    detail = getattr(exc, "detail", None) or "not found"
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                    f"{detail}"))  # fmt: skip


def _sse(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def _unless_disconnected(request: Any, work: Any, job: Job) -> Any:
    """Await ``work``; if the client disconnects first, cancel the job and give up."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        job.cancel()
        raise ApiError(499, "the client closed the request")
    finally:
        for t in (task, watch):
            t.cancel()


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream:
    """A ``text/event-stream`` ASGI response that cancels the job when the client goes away."""

    def __init__(self, chunks: AsyncIterator[bytes], job: Job) -> None:
        self.chunks, self.job = chunks, job

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]  # fmt: skip
        pump = asyncio.ensure_future(self._pump(send, headers))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.job.cancel()  # a no-op once every choice finished
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()

    async def _pump(self, send: Callable, headers: list) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under us
            pass
        finally:
            await self.chunks.aclose()


class _AccessLog:
    """ASGI middleware: one line per request -- client, request line, status, tokens, seconds."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def state(self) -> Any:
        """The Starlette app's state (``state.model``)."""
        return self.app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, logged = time.perf_counter(), [0], [False]

        def write() -> None:
            logged[0] = True
            usage = scope.get("llm_usage") or {}
            client = scope.get("client") or ("-", 0)
            tokens = (f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}"
                      if usage else "")  # fmt: skip
            access_log.info('%s:%s "%s %s HTTP/%s" %d%s %.3fs', client[0], client[1],
                            scope["method"], scope["path"], scope["http_version"], status[0],
                            tokens, time.perf_counter() - start)  # fmt: skip

        async def logged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                write()  # before the last byte leaves: the client never sees the end first
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            if not logged[0]:  # the client went away (or the app failed) before the end
                write()


def _contextmanager(lifespan: Callable) -> Callable:
    from contextlib import asynccontextmanager

    return asynccontextmanager(lifespan)


# ---- sources ---------------------------------------------------------------------------------


def _tokenizer_of(source: Any) -> Tokenizer:
    files = source.tokenizer_files() if hasattr(source, "tokenizer_files") else {}
    if not files:
        raise PartialRunError(
            "the model's tokenizer files were not found (no tokenizer.json in the model "
            "directory or on any node): pass tokenizer=Tokenizer.from_dir(DIR)"
        )
    return Tokenizer.from_files(files)


def _model_name(source: Any) -> str:
    directory = getattr(source, "directory", None)
    if directory is not None:
        return os.path.basename(os.path.normpath(directory))
    for info in getattr(source, "infos", []):
        if getattr(info, "model", ""):
            return info.model
    return "model"


def _context_len(source: Any, context_len: int | None) -> int:
    known = None
    directory = getattr(source, "directory", None)
    if directory is not None:
        from llm_sepweight import read_manifest

        known = read_manifest(directory).config.get("max_position_embeddings")
    if context_len is None:
        return min(DEFAULT_CONTEXT, known) if known else DEFAULT_CONTEXT
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 2:
        raise PartialRunError(f"context_len must be an int >= 2, got {context_len!r}")
    if known and context_len > known:
        raise PartialRunError(
            f"context_len {context_len} exceeds the model's max_position_embeddings {known}"
        )
    return context_len


# ---- serving ---------------------------------------------------------------------------------


class ApiServer:
    """uvicorn serving ``app``: on a background thread (tests, benchmarks, notebooks)::

        with ApiServer(create_app(model), port=0) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")

    or in this thread until interrupted (:meth:`run`, what :func:`serve_api` does).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="on", log_config=None)  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        original = self.server.startup

        async def startup(*args: Any, **kwargs: Any) -> None:
            await original(*args, **kwargs)
            if self.server.started:
                self._started.set()
                if self._on_ready is not None:
                    self._on_ready(self.url)

        self.server.startup = startup
        self._on_ready: Callable[[str], None] | None = None

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until SIGINT/SIGTERM; ``on_ready(url)`` once it listens."""
        self._on_ready = on_ready
        self.server.run()

    def start(self, timeout: float = 60.0) -> ApiServer:
        """Serve on a background thread; returns once the socket accepts connections."""
        self._thread = threading.Thread(target=self.server.run, name="llm-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise PartialRunError(f"the HTTP server did not start within {timeout} s")
        return self

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` the server listens on."""
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def __enter__(self) -> ApiServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_api(
    source: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_ready: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Serve ``create_app(source, **options)`` on ``host:port`` until SIGINT/SIGTERM (blocks);
    ``on_ready(url)`` is called once it accepts connections (port 0: a free port)."""
    app = create_app(source, **options)

    def ready(url: str) -> None:
        log.info("serving model %r on %s/v1", app.state.model.name, url)
        if on_ready is not None:
            on_ready(url)

    ApiServer(app, host, port).run(ready)


def read_api_key(path: str | os.PathLike[str]) -> str:
    """The API key in a file (surrounding whitespace stripped); an empty file is an error."""
    key = Path(path).read_text().strip()
    if not key:
        raise PartialRunError(f"API key file {path} is empty")
    return key
