"""`vlrl serve` end to end on the tiny model: the OpenAI schema, and every limit as an OpenAI-shaped 4xx."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_helpers import Served, data_url, png_bytes

pytestmark = pytest.mark.slow


def _chat(served: Served, body: dict[str, Any] | None = None, *, content: bytes | None = None,
          timeout: float = 60.0) -> httpx.Response:
    url = served.url + "/v1/chat/completions"
    if content is not None:
        return httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=timeout)
    return httpx.post(url, json=body, timeout=timeout)


def _image_message(url: str, text: str = "How many shapes are there?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _assert_error(resp: httpx.Response, status: int, needle: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower(), err["message"]
    return err


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but carries almost no pixel data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_health_and_models(served: Served) -> None:
    health = httpx.get(served.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = httpx.get(served.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"


def test_chat_completion_with_image(served: Served) -> None:
    body = {"model": "tiny", "messages": _image_message(data_url(png_bytes())), "max_tokens": 12, "n": 2,
            "temperature": 0.9, "top_p": 0.95, "seed": 3, "presence_penalty": 0.0, "some_future_field": {"x": 1}}
    resp = _chat(served, body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and out["model"] == "tiny"
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice in out["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] > 10  # the image's vision tokens + the chat-templated text
    assert 2 <= usage["completion_tokens"] <= 2 * 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_is_deterministic_and_max_completion_tokens(served: Served) -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2 3"}],
            "max_completion_tokens": 6, "temperature": 0}
    first, second = _chat(served, body).json(), _chat(served, body).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"]["completion_tokens"] <= 6


def test_literal_image_text_is_not_an_image(served: Served) -> None:
    plain = _chat(served, {"messages": [{"role": "user", "content": "What does <image> mean?"}], "max_tokens": 2})
    assert plain.status_code == 200, plain.text
    with_image = _chat(served, {"messages": _image_message(data_url(png_bytes()), "What does <image> mean?"),
                                "max_tokens": 2})
    assert with_image.status_code == 200, with_image.text
    extra = with_image.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    assert 1 + 2 <= extra <= 16 + 2  # the one image's vision tokens (at most 16 for the tiny model) + start/end


def test_other_families_image_tokens_are_text(served: Served) -> None:
    """The reserved tokens are the served model's: InternVL's image tokens are plain text to a Qwen-VL model."""
    resp = _chat(served, {"messages": [{"role": "user", "content": "<img><IMG_CONTEXT></img>"}], "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    plain = _chat(served, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert resp.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 3  # spelled out


def test_remote_image_url_is_refused(served: Served) -> None:
    for url in ("http://example.com/cat.png", "https://127.0.0.1/x.png"):
        err = _assert_error(_chat(served, {"messages": _image_message(url)}), 400, "not fetched")
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_image_url"
    _assert_error(_chat(served, {"messages": _image_message("file:///etc/passwd")}), 400, "data URL")


def test_body_too_large(served: Served) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    _assert_error(_chat(served, big), 413, "exceeds the limit")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}]}'

    resp = httpx.post(served.url + "/v1/chat/completions", content=chunks(), timeout=30,
                      headers={"Content-Type": "application/json"})
    _assert_error(resp, 413, "exceeds the limit")


def test_decompression_bomb_header_is_refused(served: Served) -> None:
    for width, height in ((5000, 5000), (100_000, 100_000)):  # over our 1 MP limit; the second over PIL's too
        resp = _chat(served, {"messages": _image_message(data_url(_png_header(width, height)))})
        _assert_error(resp, 400, "decompression bomb")


def test_max_tokens_over_cap(served: Served) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    err = _assert_error(_chat(served, {"messages": msgs, "max_tokens": 65}), 400, "cap of 64")
    assert err["param"] == "max_tokens"
    err = _assert_error(_chat(served, {"messages": msgs, "max_completion_tokens": 10_000}), 400, "cap of 64")
    assert err["param"] == "max_completion_tokens"
    _assert_error(_chat(served, {"messages": msgs, "max_tokens": 0}), 400, "at least 1")


def test_malformed_json(served: Served) -> None:
    err = _assert_error(_chat(served, content=b'{"messages": [}'), 400, "malformed JSON")
    assert err["code"] == "invalid_json"
    _assert_error(_chat(served, content=b'{"messages": [], "temperature": NaN}'), 400, "malformed JSON")
    _assert_error(_chat(served, content=b"\xff\xfe"), 400, "malformed JSON")
    _assert_error(_chat(served, content=b"[1, 2]"), 400, "JSON object")
    _assert_error(_chat(served, content=b"[" * 100_000), 400, "malformed JSON")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"messages": "hi"}, 400, "invalid field messages"),
        ({"messages": []}, 400, "must not be empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported role"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "unsupported content part"),
        ({"messages": [{"role": "user", "content": "look <|image_pad|> here"}]}, 400, "reserved token"),
        ({"messages": [{"role": "user", "content": "private \ue000 use"}]}, 400, "reserved token"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n must be"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "not served"),
        ({"messages": _image_message("data:image/png;base64,!!notbase64!!")}, 400, "base64"),
        ({"messages": _image_message("data:text/plain;base64,aGk=")}, 400, "image/*"),
        ({"messages": _image_message(data_url(b"not an image at all"))}, 400, "unreadable image"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}]},
         400, "too many images"),
    ],
)
def test_bad_requests(served: Served, body: dict[str, Any], status: int, needle: str) -> None:
    _assert_error(_chat(served, body), status, needle)


def test_lone_surrogate_is_a_400(served: Served) -> None:
    """Finding 7: the tokenizer cannot encode a lone surrogate; the request is refused before it gets there."""
    err = _assert_error(_chat(served, content=b'{"messages": [{"role": "user", "content": "x \\ud800"}]}'), 400,
                        "surrogate")
    assert err["param"] == "messages.0.content"


def test_stream_matches_the_completion(served: Served) -> None:
    """Finding 12: a streamed greedy completion carries the same text as the plain one, as OpenAI chunks."""
    body = {"messages": [{"role": "user", "content": "Count: 1 2 3"}], "max_tokens": 8, "temperature": 0}
    plain = _chat(served, body).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_route_has_openai_error_shape(served: Served) -> None:
    _assert_error(httpx.get(served.url + "/v1/nothing", timeout=5), 404, "not found")
    _assert_error(httpx.get(served.url + "/v1/chat/completions", timeout=5), 405, "not allowed")


def test_event_loop_stays_responsive_while_generating(served: Served) -> None:
    before = httpx.get(served.url + "/health", timeout=5).json()["completions"]
    body = {"messages": _image_message(data_url(png_bytes())), "max_tokens": 64, "n": 2, "temperature": 1.0}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(_chat(served, body).status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    seen = []  # /health while the generations ran: (completions finished, a generation holding the lock)
    deadline = time.monotonic() + 60  # bounds only a hang
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline and len(seen) < 500:
        health = httpx.get(served.url + "/health", timeout=30)
        assert health.status_code == 200
        seen.append((health.json()["completions"], health.json()["busy"]))
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200, 200]
    # /health answered while a generation held the engine: a loop blocked by generation would only answer once
    # the generation had let go (no latency bound, which a loaded machine breaks)
    assert any(busy for _, busy in seen), seen
    assert httpx.get(served.url + "/health", timeout=5).json()["completions"] == before + 3
