"""Request schema of `/v1/chat/completions`, limits, OpenAI-shaped errors, and request -> `Sample`.

Unknown request fields are ignored, as OpenAI does; known features the server cannot honour (`logprobs`, `tools`,
`response_format` other than text, ...) are refused with a 400 naming the field rather than silently ignored. Every
problem with a request becomes an `ApiError` whose message is safe to return (it never echoes request content
beyond short field names). The sizes that make a request costly (messages, content parts, text characters, stop
strings) are checked on the decoded JSON before it is validated, so that no oversized request costs more than
its parse, and none waits for the generation lock.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample
from vlrl.rollout.types import SamplingParams
from vlrl.serve.images import ImageInputError, check_image_url

# Literal "<image>" text is not an image: it travels through `Sample.messages` escaped as LITERAL_IMAGE and is
# restored by `serve.generate.encode_sample` (the character itself is refused in requests).
LITERAL_IMAGE = "\ue000"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ServeLimits:
    """Request limits of the server (each violation is a 4xx with an OpenAI-shaped error)."""

    max_body_bytes: int = 20 * 1024 * 1024  # 413 above
    max_images: int = 8  # images per request
    max_image_bytes: int = 10 * 1024 * 1024  # decoded bytes per image
    max_image_pixels: int = 4096 * 4096  # width x height declared in the header
    max_tokens_cap: int = 2048  # max_tokens / max_completion_tokens above -> 400
    default_max_tokens: int = 256  # when the request sets none (never above max_tokens_cap)
    max_n: int = 8
    max_messages: int = 256
    max_content_parts: int = 1024  # text and image parts over all messages
    max_text_chars: int = 500_000  # characters of message text over all messages (tokenizing is the cost)
    max_stop: int = 4
    max_waiting: int = 8  # requests admitted but not yet generating (checking images or queued); more -> 429


def _printable(text: str) -> str:
    """`text` with any lone surrogate escaped (`\\ud800`), so that the error response can be encoded."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lax(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lax):
    url: str
    detail: str | None = None


class ContentPart(_Lax):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Lax):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lax):
    include_usage: bool | None = None


class ChatRequest(_Lax):
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # refused unless neutral (`unsupported_feature`): accepted by OpenAI, not implemented here
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate_path(body: bytes | None, obj: Any) -> str | None:
    """The dotted path of the first string (or key) in `obj`, the JSON decoding of `body`, that holds a lone
    surrogate (JSON's `\\ud800` escape decodes to one; no Unicode encoding can carry it, so the tokenizer and the
    response encoder would fail on it); None when there is none. `body`, when given, is scanned first, so a body
    without such an escape costs one regex pass; the walk is iterative (the decoder already bounds the nesting)."""
    if body is not None and not _SURROGATE_ESCAPE.search(body):
        return None
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "(body)"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                name = _printable(key[:40])
                at = f"{path}.{name}" if path else name
                if _SURROGATE.search(key):
                    return at
                stack.append((at, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in reversed(list(enumerate(value))))
    return None


def check_sizes(obj: dict[str, Any], limits: ServeLimits) -> None:
    """Refuse (400) a request whose messages, content parts, message text or stop strings exceed `limits`,
    looking only at the decoded JSON (cheap: lengths are counted, nothing is copied or validated yet)."""
    messages = obj.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise ApiError(400, f"too many messages: {len(messages)} > {limits.max_messages}", param="messages")
    stop = obj.get("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise ApiError(400, f"stop: at most {limits.max_stop} strings, got {len(stop)}", param="stop")
    parts = chars = 0
    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            parts += len(content)
            if parts > limits.max_content_parts:
                raise ApiError(400, f"too many content parts: more than {limits.max_content_parts} per request",
                               param="messages", code="too_many_content_parts")
            chars += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if chars > limits.max_text_chars:
        raise ApiError(400, f"message text of {chars} characters exceeds this server's limit of "
                            f"{limits.max_text_chars} characters", param="messages", code="text_too_long")


def parse_request(obj: Any, limits: ServeLimits | None = None, body: bytes | None = None) -> ChatRequest:
    """Validate a decoded JSON body (`body`: its bytes, if at hand, for a fast scan for surrogate escapes) after
    the size checks of `limits`; errors name the field and the problem, never the value."""
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object")
    check_sizes(obj, limits or ServeLimits())
    where = lone_surrogate_path(body, obj)
    if where is not None:
        raise ApiError(400, f"invalid field {where}: text contains a lone surrogate (an unpaired \\ud800-\\udfff "
                            "escape), which is not valid Unicode", param=where, code="invalid_text")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ApiError(400, f"invalid field {loc or '(body)'}: {err.get('msg', 'invalid value')}", param=loc) from None


def _text(s: str, where: str, reserved: Sequence[str]) -> str:
    """Request text for `Sample.messages`: the served model's vision tokens (`reserved`) refused, since its
    processor would read them as image slots rather than text; a literal "<image>" escaped."""
    for marker in (*reserved, LITERAL_IMAGE):
        if marker in s:
            raise ApiError(400, f"{where}: text must not contain the reserved token {marker!r} "
                                "(images go in image_url parts)", param=where)
    return s.replace(IMAGE_PLACEHOLDER, LITERAL_IMAGE)


def _image_url(part: ContentPart, where: str) -> str:
    url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
    if not url:
        raise ApiError(400, f"{where}: image_url part without a url", param=where)
    try:
        check_image_url(url)
    except ImageInputError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where, code="invalid_image_url") from None
    return url


def _content(msg: Message, where: str, urls: list[str], reserved: Sequence[str]) -> str:
    """A message's text with one `<image>` placeholder per image part; image URLs appended to `urls`."""
    if msg.content is None:
        if msg.role != "assistant":
            raise ApiError(400, f"{where}.content: required for role {msg.role!r}", param=f"{where}.content")
        return ""
    if isinstance(msg.content, str):
        return _text(msg.content, f"{where}.content", reserved)
    pieces = []
    for j, part in enumerate(msg.content):
        at = f"{where}.content.{j}"
        if part.type == "text":
            pieces.append(_text(part.text or "", at, reserved))
        elif part.type == "image_url":
            urls.append(_image_url(part, at))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise ApiError(400, f"{at}: unsupported content part type {part.type!r}; use 'text' or 'image_url'",
                           param=f"{at}.type")
    return "".join(pieces)


def to_sample(req: ChatRequest, limits: ServeLimits, reserved: Sequence[str]) -> tuple[Sample, list[str]]:
    """The request's messages as a `Sample` (images as `<image>` placeholders) and its image data URLs; text
    containing any of `reserved` (the served model's vision tokens, `vlrl.models.processor.reserved_tokens`) is
    refused with a 400.

    `Sample.images` holds labels ("request-image-0", ...), not paths: the decoded images travel beside the
    sample (see `serve.generate`)."""
    if not req.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if len(req.messages) > limits.max_messages:
        raise ApiError(400, f"too many messages: {len(req.messages)} > {limits.max_messages}", param="messages")
    urls: list[str] = []
    messages = []
    for i, msg in enumerate(req.messages):
        role = ROLES.get(msg.role)
        if role is None:
            raise ApiError(400, f"messages.{i}.role: unsupported role {msg.role!r}; valid: {', '.join(ROLES)}",
                           param=f"messages.{i}.role")
        messages.append({"role": role, "content": _content(msg, f"messages.{i}", urls, reserved)})
        if len(urls) > limits.max_images:
            raise ApiError(400, f"too many images: more than {limits.max_images} per request", param="messages",
                           code="too_many_images")
    sample = Sample(id=f"chatcmpl-{uuid.uuid4().hex}", images=[f"request-image-{k}" for k in range(len(urls))],
                    messages=messages, answer="", problem_type="free_form")
    return sample, urls


def _number(value: float | None, default: float, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    v = default if value is None else float(value)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ApiError(400, f"{name} must be in {bracket}{lo}, {hi}], got {v}", param=name)
    return v


def sampling_of(req: ChatRequest, limits: ServeLimits) -> tuple[SamplingParams, list[str]]:
    """SamplingParams and stop strings of a request, each value checked against the limits."""
    name: Literal["max_completion_tokens", "max_tokens"] = (
        "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(limits.default_max_tokens, limits.max_tokens_cap) if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"{name} must be at least 1, got {max_tokens}", param=name)
    if max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"{name} = {max_tokens} exceeds this server's cap of {limits.max_tokens_cap}",
                       param=name, code="max_tokens_exceeded")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n must be between 1 and {limits.max_n}, got {n}", param="n")
    temperature = _number(req.temperature, 1.0, "temperature", 0.0, 2.0)
    top_p = _number(req.top_p, 1.0, "top_p", 0.0, 1.0, lo_open=True)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop or any(not s or len(s) > 256 for s in stop):
        raise ApiError(400, f"stop: at most {limits.max_stop} non-empty strings of up to 256 characters",
                       param="stop")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n), stop


def _unsupported(field: str, what: str) -> ApiError:
    return ApiError(400, f"{field}: {what} is not supported by this server", param=field, code="unsupported_parameter")


def check_supported(req: ChatRequest) -> None:
    """Refuse (400, naming the field) the features this server does not implement, when a request asks for them:
    a client that relies on one must not get a 200 that silently ignored it. Neutral values pass (`logprobs:
    false`, `tools: []`, `tool_choice: "none"`, `response_format: {"type": "text"}`)."""
    if req.logprobs:
        raise _unsupported("logprobs", "returning log-probabilities")
    if req.top_logprobs is not None:
        raise _unsupported("top_logprobs", "returning log-probabilities")
    if req.tools:
        raise _unsupported("tools", "tool calling")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice", "tool calling")
    if req.functions:
        raise _unsupported("functions", "function calling")
    if req.function_call not in (None, "none"):
        raise _unsupported("function_call", "function calling")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise _unsupported("response_format", "a response format other than {\"type\": \"text\"}")
