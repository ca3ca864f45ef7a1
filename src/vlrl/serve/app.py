"""The FastAPI app: OpenAI-compatible `/v1/chat/completions`, `/v1/models` and `/health` for one local model.

`create_app(engine, limits, hosts=..., port=...)` takes any object with `model_id`, `reserved_tokens` (the served
model's vision tokens, refused in request text) and `generate(sample, images, sampling, stop, seed, should_stop,
on_text) -> GenerationResult` (`serve.generate.ServedModel` for a local HF model). Generation is serialised by one lock and
runs in a worker thread, so the event loop keeps answering `/health` and rejecting bad requests while the model
works.

The body is read by hand (not by FastAPI's parser) so that its size is capped before it is buffered and every
error, including malformed JSON, has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

A client that disconnects is noticed while its request waits (it leaves the queue at once) or generates (the
engine's `should_stop` ends the decode at the next step). `stream: true` is answered with server-sent events in
OpenAI's `chat.completion.chunk` format as the text is generated (the engine's `on_text` pieces, each a content
chunk; the `hf` engine gives them token by token, `vllm` each choice whole): the response starts with the first
piece, so an error found before it (context length, an image the processor refuses) is still a plain JSON error,
and one after it ends the stream with an `error` event. A streaming client that disconnects stops the generation
too.

A web page in a local browser must not be able to drive the model: every request must name this server in
`Host` (a DNS-rebinding page names its own domain), a request from a browser page of another origin (`Origin`)
is refused, no CORS header is ever sent, and chat requests must be `application/json` (which a cross-origin
page cannot send without a CORS preflight).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from vlrl.data.sample import Sample
from vlrl.rollout.types import SamplingParams
from vlrl.serve.generate import Cancelled, ContextLengthError, GenerationResult
from vlrl.serve.images import ImageInputError, check_image_bytes, data_url_bytes, decode_image_bytes
from vlrl.serve.schemas import (
    ApiError,
    ChatRequest,
    ServeLimits,
    check_supported,
    parse_request,
    sampling_of,
    to_sample,
)

log = logging.getLogger(__name__)


class Engine(Protocol):
    model_id: str
    reserved_tokens: tuple[str, ...]  # text a request must not contain (`vlrl.models.processor.reserved_tokens`)

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> GenerationResult: ...


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
RETRY_AFTER_SECONDS = 1  # the 429's Retry-After: a queue slot frees when one generation ends
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s:\[\]/@]+))(?::(?P<port>[0-9]{1,5}))?", re.ASCII)
_ORIGIN = re.compile(r"https?://(?P<host>[^/]+)/?", re.ASCII | re.IGNORECASE)


def host_allowed(host: str, names: Sequence[str], port: int | None) -> bool:
    """Whether a `Host` header value (`name[:port]`, `[v6][:port]`) names this server: one of `names` (case
    insensitive) and, when it carries a port and `port` is given, that port."""
    m = _HOST.fullmatch(host)
    if m is None:
        return False
    if m["port"] is not None and port is not None and int(m["port"]) != port:
        return False
    return (m["v6"] or m["name"]).lower() in {n.lower() for n in names}


def origin_allowed(origin: str, names: Sequence[str], port: int | None) -> bool:
    """Whether an `Origin` header names a page served by this server itself (same host and port); "null" and
    every other origin do not."""
    m = _ORIGIN.fullmatch(origin)
    return m is not None and host_allowed(m["host"], names, port)


class HostGuard:
    """ASGI middleware: refuse a request whose `Host` does not name this server (400) or whose `Origin` is
    another site's (403), before any route runs."""

    def __init__(self, app: ASGIApp, names: Sequence[str], port: int | None, on_error: Callable[[], None]) -> None:
        self.app, self.names, self.port, self.on_error = app, tuple(names), port, on_error

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is None or not host_allowed(host, self.names, self.port):
            return ApiError(400, "invalid Host header: this server answers only requests addressed to "
                                 f"{', '.join(self.names)}" + (f" on port {self.port}" if self.port else ""),
                            code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.names, self.port):
            return ApiError(403, "cross-origin requests are refused: the request's Origin is not this server",
                            code="forbidden_origin")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = self._refusal(scope) if scope["type"] in ("http", "websocket") else None
        if err is None:
            await self.app(scope, receive, send)
            return
        self.on_error()
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


class _State:
    """Mutable server state: the generation lock, the queue length and counters reported by /health."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # queues requests on the event loop
        self.thread_lock = threading.Lock()  # serialises the model in the worker threads
        self.waiting = 0  # admitted requests not yet holding the lock (checking images or queued)
        self.completions = 0  # chat completions answered with 200
        self.errors = 0  # requests answered with an error
        self.started = time.time()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(buf)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:200] or type(exc).__name__
        raise ApiError(400, f"malformed JSON body: {msg}", code="invalid_json") from None


def check_images(urls: list[str], limits: ServeLimits) -> list[bytes]:
    """The images' bytes after the cheap checks (data URL, size, format, header pixels); nothing decoded."""
    raws = []
    for k, url in enumerate(urls):
        try:
            raw = data_url_bytes(url, max_bytes=limits.max_image_bytes)
            check_image_bytes(raw, max_pixels=limits.max_image_pixels)
        except ImageInputError as exc:
            raise ApiError(400, f"image {k}: {exc}", param="messages", code="invalid_image") from None
        raws.append(raw)
    return raws


def decode_images(raws: list[bytes], limits: ServeLimits) -> list[Image.Image]:
    images = []
    for k, raw in enumerate(raws):
        try:
            images.append(decode_image_bytes(raw, max_pixels=limits.max_image_pixels))
        except ImageInputError as exc:
            raise ApiError(400, f"image {k}: {exc}", param="messages", code="invalid_image") from None
    return images


def _usage(result: GenerationResult) -> dict[str, int]:
    completion_tokens = sum(c.completion_tokens for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens}


def _response(result: GenerationResult, request_id: str, model_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(result.choices)
        ],
        "usage": _usage(result),
    }


class _Chunks:
    """OpenAI `chat.completion.chunk` events of one streamed request."""

    def __init__(self, request_id: str, model_id: str, include_usage: bool) -> None:
        self.head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model_id}
        self.extra: dict[str, Any] = {"usage": None} if include_usage else {}
        self.include_usage = include_usage

    def choice(self, index: int, delta: dict[str, str], finish: str | None = None) -> str:
        return _event({**self.head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}], **self.extra})

    def end(self, result: GenerationResult) -> list[str]:
        """Each choice's finish chunk, the usage chunk (`stream_options.include_usage`), then `[DONE]`."""
        events = [self.choice(i, {}, c.finish_reason) for i, c in enumerate(result.choices)]
        if self.include_usage:
            events.append(_event({**self.head, "choices": [], "usage": _usage(result)}))
        return events + ["data: [DONE]\n\n"]


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


Piece = tuple[int, str]  # (choice index, text)


async def _next_pieces(queue: asyncio.Queue[Piece], task: asyncio.Future[Any]) -> list[Piece]:
    """The pieces queued now, else wait for one or for the generation to end ([]: it ended, nothing queued). The
    generating thread queues its pieces before its result reaches the loop, so none is left once `[]` comes."""
    if queue.empty() and not task.done():
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            pieces = [getter.result()]
            while not queue.empty():
                pieces.append(queue.get_nowait())
            return pieces
    pieces = []
    while not queue.empty():
        pieces.append(queue.get_nowait())
    return pieces


async def _start_stream(engine: Engine, state: _State, limits: ServeLimits, job: Job, cancel: threading.Event,
                        chunks: _Chunks) -> Response:
    """Start generating (the caller holds `state.lock`; the generation releases it when it ends) and answer once
    the first piece of text is there, or the generation ended without one (then errors are still plain JSON)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Piece] = asyncio.Queue()

    def on_text(index: int, text: str) -> None:  # the generating thread
        loop.call_soon_threadsafe(queue.put_nowait, (index, text))

    task = asyncio.ensure_future(_generate_locked(engine, state, limits, job, cancel, on_text))
    task.add_done_callback(lambda _: state.lock.release())
    try:
        first = await _next_pieces(queue, task)
    except BaseException:
        cancel.set()  # this request was cancelled: the generation stops at its next token
        raise
    if not first:
        result = task.result()  # an ApiError (context length, ...) becomes a plain JSON error here
        if result is None or cancel.is_set():
            return Response(status_code=499)
    return StreamingResponse(_stream(task, queue, first, chunks, job[2].n, cancel, state),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(task: asyncio.Future[GenerationResult | None], queue: asyncio.Queue[Piece], first: list[Piece],
                  chunks: _Chunks, n: int, cancel: threading.Event, state: _State) -> AsyncIterator[str]:
    """The events of a streamed request: a role chunk per choice, a content chunk per piece, the end. A client that
    goes meanwhile (the response stops being read) stops the generation."""
    try:
        for i in range(n):
            yield chunks.choice(i, {"role": "assistant", "content": ""})
        pieces = first
        while pieces:
            for index, text in pieces:
                yield chunks.choice(index, {"content": text})
            pieces = await _next_pieces(queue, task)
        try:
            result = await task
        except ApiError as err:  # found after text was sent: the status is 200 already
            state.errors += 1
            yield _event(err.body())
            return
        if result is None or cancel.is_set():
            return
        state.completions += 1
        for event in chunks.end(result):
            yield event
    finally:
        if not task.done():
            cancel.set()


def check_content_type(request: Request) -> None:
    """A chat request must say it is JSON: a browser page can send `text/plain` or form bodies to any origin
    without a preflight, never `application/json`."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype[:60] or 'none'!r}",
                       code="unsupported_media_type")


def validate(req: ChatRequest, engine: Engine, limits: ServeLimits) -> tuple[Sample, list[str], SamplingParams,
                                                                             list[str]]:
    """Everything about a parsed request that can be refused without the model: (sample, image URLs, sampling,
    stop strings)."""
    check_supported(req)
    if req.model is not None and req.model != engine.model_id:
        raise ApiError(404, f"model {req.model[:100]!r} is not served here; available: {engine.model_id!r}",
                       param="model", code="model_not_found")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(400, "seed must be in [0, 2**63)", param="seed")
    sample, urls = to_sample(req, limits, engine.reserved_tokens)
    sampling, stop = sampling_of(req, limits)
    return sample, urls, sampling, stop


async def _until_disconnected(request: Request, cancel: threading.Event) -> None:
    """Return once the client has gone (the body is read, so the next ASGI message is the disconnect), setting
    `cancel` for the worker thread."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def _drop(acquire: asyncio.Future[Any], lock: asyncio.Lock) -> None:
    """Give up a pending `lock.acquire()`: release the lock if it was acquired, else cancel the wait."""
    if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
        lock.release()
    else:
        acquire.cancel()


async def _acquire_unless_gone(lock: asyncio.Lock, gone: asyncio.Task[None]) -> bool:
    """Wait for `lock` (True: held) unless the client goes first (`gone` finishes: False, not held)."""
    acquire = asyncio.ensure_future(lock.acquire())
    try:
        await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _drop(acquire, lock)
        raise
    if gone.done():
        _drop(acquire, lock)
        return False
    return True


async def _complete(request: Request, engine: Engine, limits: ServeLimits, state: _State) -> Response:
    """Validate, check the images, then decode and generate under the lock in a worker thread; a request whose
    client goes meanwhile leaves the queue or stops generating (its answer is never sent)."""
    check_content_type(request)
    body = await read_body(request, limits.max_body_bytes)
    req = parse_request(parse_json(body), limits, body)
    sample, urls, sampling, stop = validate(req, engine, limits)
    if state.waiting >= limits.max_waiting:
        raise ApiError(429, f"server busy: {state.waiting} requests already waiting", type_="rate_limit_error",
                       code="server_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    state.waiting += 1  # the slot is taken here, with no await since the check: concurrent requests see it
    cancel = threading.Event()
    gone = asyncio.create_task(_until_disconnected(request, cancel))
    try:
        try:
            raws = await asyncio.to_thread(check_images, urls, limits)  # bad images are refused before the lock
            held = await _acquire_unless_gone(state.lock, gone)
        finally:
            state.waiting -= 1
        if not held:
            return Response(status_code=499)  # nobody reads it: the client is gone
        job = (sample, raws, sampling, stop, req.seed)
        if req.stream:  # the lock passes to the generation, which releases it when it ends
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _start_stream(engine, state, limits, job, cancel,
                                       _Chunks(sample.id, engine.model_id, include_usage))
        try:
            result = await _generate_locked(engine, state, limits, job, cancel)
        finally:
            state.lock.release()
    finally:
        gone.cancel()  # a stream's response watches for the client itself from here
    if result is None or cancel.is_set():
        return Response(status_code=499)
    state.completions += 1
    return JSONResponse(_response(result, sample.id, engine.model_id))


Job = tuple[Sample, list[bytes], SamplingParams, list[str], int | None]  # sample, image bytes, sampling, stop, seed


def _run_locked(engine: Engine, state: _State, limits: ServeLimits, job: Job, cancel: threading.Event,
                on_text: Callable[[int, str], None] | None = None) -> GenerationResult | None:
    """Decode the images and generate, holding the thread lock: the real serialiser (it holds even if the
    awaiting request was cancelled), and it keeps at most one request's decoded images in memory. None: the
    client went before its turn (nothing decoded)."""
    sample, raws, sampling, stop, seed = job
    with state.thread_lock:
        if cancel.is_set():
            return None
        images = decode_images(raws, limits)
        try:
            if on_text is None:
                return engine.generate(sample, images, sampling, stop, seed, should_stop=cancel.is_set)
            return engine.generate(sample, images, sampling, stop, seed, should_stop=cancel.is_set, on_text=on_text)
        except Cancelled:
            return None


async def _generate_locked(engine: Engine, state: _State, limits: ServeLimits, job: Job, cancel: threading.Event,
                           on_text: Callable[[int, str], None] | None = None) -> GenerationResult | None:
    """Generate in a worker thread; the caller holds `state.lock` (one generation at a time)."""
    try:
        return await asyncio.to_thread(_run_locked, engine, state, limits, job, cancel, on_text)
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:  # the processor refused an input (e.g. an image of extreme aspect ratio)
        raise ApiError(400, f"the model's processor refused the input: {exc}") from None


def _error_response(err: ApiError, state: _State) -> JSONResponse:
    state.errors += 1
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: Engine, limits: ServeLimits | None = None, *, hosts: Sequence[str] = LOOPBACK_NAMES,
               port: int | None = None) -> FastAPI:
    """The app serving `engine` under `limits` (defaults: `ServeLimits()`), answering requests whose `Host`
    names one of `hosts` (with `port`, when the header carries one and `port` is given) from no other origin."""
    limits = limits or ServeLimits()
    state = _State()
    app = FastAPI(title="vlrl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlrl = state

    def count_error() -> None:
        state.errors += 1

    app.add_middleware(HostGuard, names=hosts, port=port, on_error=count_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(exc.status_code, str(exc.detail), code="not_found"
                                        if exc.status_code == 404 else None), state)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal server error ({type(exc).__name__})", type_="server_error"),
                               state)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "completions": state.completions, "errors": state.errors,
                "waiting": state.waiting, "busy": state.lock.locked(), "uptime": round(time.time() - state.started, 3)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "vlrl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            return await _complete(request, engine, limits, state)
        except ApiError as err:
            return _error_response(err, state)

    return app
