"""The FastAPI app: OpenAI-compatible `/v1/chat/completions`, `/v1/models` and `/health` for one local model.

`create_app(engine, limits)` takes any object with `model_id`, `reserved_tokens` (the served model's vision
tokens, refused in request text) and `generate(sample, images, sampling, stop, seed) -> GenerationResult`
(`serve.generate.ServedModel` for a local HF model). Generation is serialised by one lock and runs in a worker thread, so the event loop keeps
answering `/health` and rejecting bad requests while the model works.

The body is read by hand (not by FastAPI's parser) so that its size is capped before it is buffered and every
error, including malformed JSON, has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlrl.data.sample import Sample
from vlrl.rollout.types import SamplingParams
from vlrl.serve.generate import ContextLengthError, GenerationResult
from vlrl.serve.images import ImageInputError, check_image_bytes, data_url_bytes, decode_image_bytes
from vlrl.serve.schemas import ApiError, ServeLimits, parse_request, sampling_of, to_sample

log = logging.getLogger(__name__)


class Engine(Protocol):
    model_id: str
    reserved_tokens: tuple[str, ...]  # text a request must not contain (`vlrl.models.processor.reserved_tokens`)

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None) -> GenerationResult: ...


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


def _response(result: GenerationResult, request_id: str, model_id: str) -> dict[str, Any]:
    completion_tokens = sum(c.completion_tokens for c in result.choices)
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
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": result.prompt_tokens + completion_tokens},
    }


async def _complete(request: Request, engine: Engine, limits: ServeLimits, state: _State) -> dict[str, Any]:
    """Validate, check the images, then decode and generate under the lock in a worker thread."""
    req = parse_request(parse_json(await read_body(request, limits.max_body_bytes)))
    if req.stream:
        raise ApiError(400, "stream=true is not supported by this server; send stream=false", param="stream")
    if req.model is not None and req.model != engine.model_id:
        raise ApiError(404, f"model {req.model[:100]!r} is not served here; available: {engine.model_id!r}",
                       param="model", code="model_not_found")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(400, "seed must be in [0, 2**63)", param="seed")
    sample, urls = to_sample(req, limits, engine.reserved_tokens)
    sampling, stop = sampling_of(req, limits)
    if state.waiting >= limits.max_waiting:
        raise ApiError(429, f"server busy: {state.waiting} requests already waiting", type_="rate_limit_error",
                       code="server_busy")
    state.waiting += 1  # the slot is taken here, with no await since the check: concurrent requests see it
    try:
        raws = await asyncio.to_thread(check_images, urls, limits)  # bad images are refused before the lock
        await state.lock.acquire()
    finally:
        state.waiting -= 1
    try:
        result = await _generate_locked(engine, state, limits, sample, raws, sampling, stop, req.seed)
    finally:
        state.lock.release()
    state.completions += 1
    return _response(result, sample.id, engine.model_id)


def _run_locked(engine: Engine, state: _State, limits: ServeLimits, sample: Sample, raws: list[bytes],
                sampling: SamplingParams, stop: list[str], seed: int | None) -> GenerationResult:
    """Decode the images and generate, holding the thread lock: the real serialiser (it holds even if the
    awaiting request was cancelled), and it keeps at most one request's decoded images in memory."""
    with state.thread_lock:
        images = decode_images(raws, limits)
        return engine.generate(sample, images, sampling, stop, seed)


async def _generate_locked(engine: Engine, state: _State, limits: ServeLimits, sample: Sample, raws: list[bytes],
                           sampling: SamplingParams, stop: list[str], seed: int | None) -> GenerationResult:
    """Generate in a worker thread; the caller holds `state.lock` (one generation at a time)."""
    try:
        return await asyncio.to_thread(_run_locked, engine, state, limits, sample, raws, sampling, stop, seed)
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:  # the processor refused an input (e.g. an image of extreme aspect ratio)
        raise ApiError(400, f"the model's processor refused the input: {exc}") from None


def _error_response(err: ApiError, state: _State) -> JSONResponse:
    state.errors += 1
    return JSONResponse(err.body(), status_code=err.status)


def create_app(engine: Engine, limits: ServeLimits | None = None) -> FastAPI:
    """The app serving `engine` under `limits` (defaults: `ServeLimits()`)."""
    limits = limits or ServeLimits()
    state = _State()
    app = FastAPI(title="vlrl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlrl = state

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
    async def chat_completions(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await _complete(request, engine, limits, state))
        except ApiError as err:
            return _error_response(err, state)

    return app
