"""Fuzzing the server's request handling: `/v1/chat/completions` of `vlrl.serve.app` through a TestClient with a
fake engine (no model), and the image data-URL checks of `vlrl.serve.images`.

Bodies are hypothesis-generated: arbitrary JSON values, chat requests whose every field may have an odd type or
value (surrogates, reserved tokens, huge or nested content, unknown roles and part types, bad data URLs, absurd
sampling values, unsupported features), and raw bytes (truncated, deeply nested, invalid UTF-8, surrogate escapes).
Properties, per case: the answer is a 200 (a completion, or a stream of chunks ending in `[DONE]`) or an
OpenAI-shaped 4xx (`{"error": {"message", "type", "param", "code"}}`), never a 500; the text that reaches the
engine is encodable (the real tokenizer fails on a lone surrogate); each case holds the bounds of `limits`.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fuzzing import fuzz_settings, limits
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlrl.data.sample import Sample
from vlrl.rollout.types import SamplingParams
from vlrl.serve.app import create_app
from vlrl.serve.generate import Choice, GenerationResult
from vlrl.serve.images import ImageInputError, check_image_bytes, data_url_bytes, decode_image_bytes
from vlrl.serve.schemas import ServeLimits

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_images=3, max_image_bytes=1 << 16, max_image_pixels=1 << 16,
                     max_text_chars=20_000, max_content_parts=64, max_messages=32)
ALLOWED = {200, 400, 404, 413, 415}


class FakeEngine:
    """An engine that checks what a real one would choke on: every message's text must encode as UTF-8."""

    model_id = "fuzz"
    reserved_tokens = ("<|image_pad|>", "<|vision_start|>")

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        for message in sample.messages:
            message["content"].encode("utf-8")  # what the tokenizer needs; a lone surrogate raises
        assert len(images) == len(sample.images) <= LIMITS.max_images
        return GenerationResult(prompt_tokens=3, choices=[Choice("ok", 1, "stop") for _ in range(sampling.n)])


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(FakeEngine(), LIMITS, hosts=("testserver",))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


_PNG = _png(8, 6)
TEXTS = ["hi", "<image>", "<|image_pad|>", "\ud800", "\udfff x", "\ue000", "\x00", "😀", "a" * 30_000, "{", "\\u0000"]
URLS = [
    f"data:image/png;base64,{_b64(_PNG)}", f"data:image/png;base64,{_b64(_PNG)[:-3]}", "data:image/png;base64,!!",
    "data:,", "data:text/plain;base64,aGk=", "data:image/png,rawbytes", f"DATA:IMAGE/PNG;BASE64,{_b64(_PNG)}",
    f"data:image/png;base64,{_b64(_png(300, 300))}", f"data:image/png;base64,{_b64(_PNG[:40])}",
    "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", "http://example.com/x.png", "file:///etc/passwd", "",
    "data:image/png;base64," + "A" * 100_000, "data:image/\ud800;base64,AA==", "javascript:alert(1)",
]  # fmt: skip
_odd = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                 st.floats(allow_nan=False), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_text = st.one_of(st.sampled_from(TEXTS), st.text(max_size=40))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _odd)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": st.sampled_from(URLS)}),
                                                  st.sampled_from(URLS), _odd)}),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["input_audio", "refusal", "TEXT"]), _odd)}),
)
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "developer", "assistant", "tool", "User"]), _odd)},
    optional={"content": st.one_of(_text, st.lists(_part, max_size=5), _odd)},
)
_field_values: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.just("fuzz"), _text, _odd),
    "max_tokens": st.one_of(st.integers(-3, 70), _odd), "max_completion_tokens": st.one_of(st.integers(-3, 70), _odd),
    "temperature": st.one_of(st.floats(-1, 3), _odd), "top_p": st.one_of(st.floats(-0.5, 1.5), _odd),
    "n": st.one_of(st.integers(-1, 12), _odd), "seed": st.one_of(st.integers(-(2**65), 2**65), _odd),
    "stop": st.one_of(_text, st.lists(_text, max_size=6), _odd), "stream": st.one_of(st.booleans(), _odd),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _odd),
    "logprobs": st.one_of(st.booleans(), _odd), "top_logprobs": _odd, "tools": _odd, "tool_choice": _odd,
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), _odd),
    "functions": _odd, "\ud800": _odd,
}  # fmt: skip
_request = st.fixed_dictionaries({"messages": st.one_of(st.lists(_message, min_size=1, max_size=4), _odd)},
                                 optional=_field_values)
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                     max_leaves=20)
_raw = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 200_000).map(lambda k: b"[" * k),
    st.integers(1, 5_000).map(lambda k: b'{"messages": [' + b'{"content": ' * k),
    st.sampled_from([b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages": "\\udc00"}',
                     b'{"messages": [{"role": "user", "content": "x"}], "n": 1e999}', b"\xff\xfe{}", b"NaN",
                     b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}']),
    _request.map(lambda r: json.dumps(r).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),  # truncated at any byte
)


def _check(resp: Any) -> None:
    assert resp.status_code in ALLOWED, (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        assert err["type"] == "invalid_request_error"
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]")
    else:
        out = resp.json()
        assert out["object"] == "chat.completion" and out["choices"]


def _post(client: TestClient, content: bytes, target: str) -> None:
    with limits(target):
        _check(client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes, as a client's would


@fuzz_settings(examples=125)
@given(_request)
def test_fuzz_chat_request(client: TestClient, body: dict[str, Any]) -> None:
    _post(client, _dumps(body), "serve.chat_completions.request")


@fuzz_settings(examples=60)
@given(_json)
def test_fuzz_json_value(client: TestClient, body: Any) -> None:
    _post(client, _dumps(body), "serve.chat_completions.json_value")


@fuzz_settings(examples=75)
@given(_raw)
def test_fuzz_raw_body(client: TestClient, body: bytes) -> None:
    _post(client, body, "serve.chat_completions.raw_body")


_data_url = st.one_of(
    st.sampled_from(URLS),
    st.text(max_size=60),
    st.builds(lambda mime, params, payload: f"data:{mime}{params},{payload}",
              st.sampled_from(["image/png", "image/jpeg", "image/gif", "text/html", "", "image/x"]),
              st.sampled_from([";base64", "", ";charset=utf-8;base64", ";base64;x=y", ";BASE64"]),
              st.one_of(st.just(_b64(_PNG)), st.binary(max_size=300).map(_b64), st.text(max_size=40))),
)


@fuzz_settings(examples=100)
@given(_data_url)
def test_fuzz_image_data_url(url: str) -> None:
    """Only `ImageInputError` (a 400's message), and an accepted image is within the pixel limit."""
    with limits("serve.images.data_url"):
        try:
            raw = data_url_bytes(url, max_bytes=LIMITS.max_image_bytes)
            w, h = check_image_bytes(raw, max_pixels=LIMITS.max_image_pixels)
            image = decode_image_bytes(raw, max_pixels=LIMITS.max_image_pixels)
        except ImageInputError:
            return
        assert image.size == (w, h) and w * h <= LIMITS.max_image_pixels and image.mode == "RGB"
