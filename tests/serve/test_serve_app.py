"""The app with a scripted engine under uvicorn in a thread (fast, no model): generation is serialised, the
queue is bounded (429 with Retry-After), engine errors keep OpenAI's error shape, abandoned requests stop,
oversized ones are refused before the lock, streaming, unsupported features, Host / Origin / Content-Type checks;
plus the CLI's argument parsing and a port in use."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from serve_helpers import data_url, free_port, png_bytes

from vlrl.data.sample import Sample
from vlrl.rollout.types import SamplingParams
from vlrl.serve import app as app_module
from vlrl.serve.app import create_app
from vlrl.serve.generate import Choice, ContextLengthError, GenerationResult
from vlrl.serve.schemas import ServeLimits
from vlrl.serve.server import is_loopback, parse_args


class ScriptedEngine:
    model_id = "fake"
    reserved_tokens = ("<|image_pad|>", "<IMG_CONTEXT>")

    def __init__(self) -> None:
        self.delay = 0.0
        self.gate: threading.Event | None = None  # when set, generate waits for it (the test decides when it ends)
        self.mid_gate: threading.Event | None = None  # when set, a streaming generate waits for it after its first
        #   piece of text (the test reads that piece while the generation is still running)
        self.fail_at_start: Exception | None = None  # raised before any token
        self.fail_after_text: Exception | None = None  # raised after the first piece of a streamed text
        self.fail: Exception | None = None
        self.active = 0
        self.max_active = 0
        self.calls = 0  # generate calls
        self.tokens = 0  # decode steps taken over all calls
        self.should_stop: Callable[[], bool] | None = None  # the last call's cancellation check
        self.seen: list[tuple[Sample, list[Image.Image], SamplingParams, list[str]]] = []
        self._lock = threading.Lock()

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
            self.should_stop = should_stop
        try:
            time.sleep(self.delay)
            if self.fail_at_start is not None:
                raise self.fail_at_start
            if self.gate is not None:
                assert self.gate.wait(timeout=30)
            for t in range(sampling.max_new_tokens):  # one "decode step" per token, as the hf engine checks
                if should_stop is not None and should_stop():
                    break
                self.tokens += 1
                if on_text is not None and t < 2:  # the text in two pieces: "answer", then " {i}"
                    for i in range(sampling.n):
                        on_text(i, "answer" if t == 0 else f" {i}")
                    if t == 0 and self.fail_after_text is not None:
                        raise self.fail_after_text
                    if t == 0 and self.mid_gate is not None:
                        assert self.mid_gate.wait(timeout=30)
            if self.fail is not None:
                raise self.fail
            self.seen.append((sample, images, sampling, list(stop)))
            return GenerationResult(prompt_tokens=7, choices=[Choice(f"answer {i}", 3, "stop") for i in range(sampling.n)])
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture
def app_server() -> Iterator[tuple[str, ScriptedEngine]]:
    engine = ScriptedEngine()
    app = create_app(engine, ServeLimits(max_waiting=2, max_tokens_cap=32))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


def test_request_reaches_the_engine_as_a_sample(app_server: tuple[str, ScriptedEngine]) -> None:
    url, engine = app_server
    body = {"messages": [{"role": "developer", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "A "},
                                                      {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                                      {"type": "text", "text": " B"}]}],
            "n": 3, "max_tokens": 5, "temperature": 0.5, "stop": "END"}
    out = _post(url, body).json()
    assert [c["message"]["content"] for c in out["choices"]] == ["answer 0", "answer 1", "answer 2"]
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    sample, images, sampling, stop = engine.seen[0]
    assert sample.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "A <image> B"}]
    assert len(images) == 1 and images[0].size == (64, 48) and images[0].mode == "RGB"
    assert (sampling.n, sampling.max_new_tokens, sampling.temperature) == (3, 5, 0.5) and stop == ["END"]


def _wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_generation_is_serialised_and_queue_bounded(app_server: tuple[str, ScriptedEngine],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One request runs (held by a gate), five more arrive while their image checks are held too: exactly
    max_waiting=2 are admitted and the other 3 refused with 429 at once, whatever the timing (a request
    still checking its images holds its place in the queue); opening the gates completes the 3 admitted."""
    url, engine = app_server
    engine.gate, checks = threading.Event(), threading.Event()
    check_images = app_module.check_images

    def held_check(urls: list[str], limits: ServeLimits) -> list[bytes]:
        assert checks.wait(timeout=30)
        return check_images(urls, limits)

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(max_workers=6) as pool:
        first = pool.submit(_post, url, body)
        _wait_for(lambda: engine.active == 1, "the first request to reach the engine")
        monkeypatch.setattr(app_module, "check_images", held_check)
        rest = [pool.submit(_post, url, body) for _ in range(5)]
        _wait_for(lambda: sum(f.done() for f in rest) == 3, "three requests to be refused")
        health = httpx.get(url + "/health", timeout=5).json()  # answered while the engine works
        refused = [f.result() for f in rest if f.done()]
        checks.set()
        engine.gate.set()
        responses = [first.result(timeout=30)] + [f.result(timeout=30) for f in rest]
    assert (health["waiting"], health["busy"]) == (2, True)
    assert [r.status_code for r in refused] == [429, 429, 429]
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 429, 429, 429]
    assert engine.max_active == 1
    busy = refused[0].json()["error"]
    assert busy["type"] == "rate_limit_error" and busy["code"] == "server_busy"
    assert all(int(r.headers.get("retry-after", "0")) >= 1 for r in refused)  # finding 5: clients know when
    assert httpx.get(url + "/health", timeout=5).json()["waiting"] == 0


def test_engine_errors_keep_the_error_shape(app_server: tuple[str, ScriptedEngine]) -> None:
    url, engine = app_server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    engine.fail = ContextLengthError("prompt (5000 tokens) + max_tokens (2) exceed the model's context")
    err = _post(url, body).json()["error"]
    assert err["code"] == "context_length_exceeded" and "context" in err["message"]
    engine.fail = RuntimeError("secret internal detail")
    resp = _post(url, body)
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error" and "secret" not in resp.text
    engine.fail = None
    assert _post(url, body).status_code == 200  # the lock was released


def test_cli_arguments() -> None:
    cfg = parse_args(["--model", "/m/tiny-model", "--port", "9", "--max-tokens-cap", "16", "--max-images", "1"])
    assert (cfg.host, cfg.port, cfg.model_id) == ("127.0.0.1", 9, "tiny-model")
    assert cfg.limits.max_tokens_cap == 16 and cfg.limits.max_images == 1
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--max-n", "0"])
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


# --- issue 18: bounded requests (4), abandoned requests (5), lone surrogates (7), compatibility and origin (12) ---


def _raw_request(url: str, body: dict[str, Any]) -> socket.socket:
    """A chat request sent on a raw socket, the response never read: the test decides when the client leaves."""
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + data)
    return sock


def _health(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/health", timeout=5).json())


def test_abandoned_requests_stop_and_leave_the_queue(app_server: tuple[str, ScriptedEngine]) -> None:
    """Finding 5: three clients give up (close their connections): the one generating is cancelled before its
    next decode step and the two queued ones leave the queue at once and never reach the engine."""
    url, engine = app_server
    engine.gate = threading.Event()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    first = _raw_request(url, body)
    _wait_for(lambda: engine.active == 1, "the first request to reach the engine")
    queued = [_raw_request(url, body) for _ in range(2)]
    _wait_for(lambda: _health(url)["waiting"] == 2, "two requests to queue")
    for sock in (first, *queued):
        sock.close()
    _wait_for(lambda: _health(url)["waiting"] == 0, "the gone clients' requests to leave the queue")
    _wait_for(lambda: engine.should_stop is not None and engine.should_stop(), "the generation to be cancelled")
    engine.gate.set()
    _wait_for(lambda: engine.active == 0 and not _health(url)["busy"], "the cancelled generation to end")
    assert (engine.calls, engine.tokens) == (1, 0)  # no decode step after the cancel; the queued never ran
    resp = _post(url, {**body, "max_tokens": 5})  # the next client is served at once, to the end
    assert resp.status_code == 200 and (engine.calls, engine.tokens) == (2, 5)


def test_oversized_requests_are_refused_before_the_lock(app_server: tuple[str, ScriptedEngine]) -> None:
    """Finding 4: too much text or too many content parts is a 400 found while validating: it neither waits
    for the generation lock (held here by a gated request) nor reaches the engine."""
    url, engine = app_server
    engine.gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(_post, url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        _wait_for(lambda: engine.active == 1, "the first request to reach the engine")
        long_text = {"messages": [{"role": "system", "content": "s" * 300_000},
                                  {"role": "user", "content": [{"type": "text", "text": "x" * 300_000}]}]}
        err = _assert_api_error(_post(url, long_text), 400, "characters")
        assert err["code"] == "text_too_long" and err["param"] == "messages"
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 50_000}]}
        err = _assert_api_error(_post(url, parts), 400, "content parts")
        assert err["param"] == "messages"
        many = {"messages": [{"role": "user", "content": "x"}] * 5_000}
        _assert_api_error(_post(url, many), 400, "too many messages")
        assert engine.active == 1 and _health(url)["busy"]  # all answered while the lock is held
        engine.gate.set()
        assert running.result(timeout=30).status_code == 200
    assert engine.calls == 1


def _assert_api_error(resp: httpx.Response, status: int, needle: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower(), err["message"]
    return dict(err)


def _post_raw(url: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json"} if headers is None else headers, timeout=30)


def test_lone_surrogates_are_a_400(app_server: tuple[str, ScriptedEngine]) -> None:
    """Finding 7: a lone surrogate escape (valid JSON, not encodable text) is refused naming its field."""
    url, engine = app_server
    msg = b'{"role": "user", "content": "hi"}'
    err = _assert_api_error(_post_raw(url, b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}'), 400,
                            "surrogate")
    assert err["param"] == "messages.0.content"
    err = _assert_api_error(_post_raw(url, b'{"messages": [' + msg + b'], "stop": ["\\udfff"]}'), 400, "surrogate")
    assert err["param"] == "stop.0"
    _assert_api_error(_post_raw(url, b'{"messages": [' + msg + b'], "model": "\\udc00"}'), 400, "surrogate")
    pair = _post_raw(url, b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}')
    assert pair.status_code == 200, pair.text  # a surrogate pair is one valid character
    assert engine.seen[-1][0].messages[0]["content"] == "smile \U0001f600"


def _events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_stream_sends_chat_completion_chunks(app_server: tuple[str, ScriptedEngine]) -> None:
    """Finding 12: `stream: true` answers with server-sent events in OpenAI's chunk format, then `[DONE]`."""
    url, _ = app_server
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake" for c in chunks)
    text, roles, finish = {0: "", 1: ""}, {}, {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            delta, i = choice["delta"], choice["index"]
            roles.setdefault(i, delta.get("role"))
            text[i] += delta.get("content") or ""
            if choice["finish_reason"] is not None:
                finish[i] = choice["finish_reason"]
    assert text == {0: "answer 0", 1: "answer 1"} and roles == {0: "assistant", 1: "assistant"}
    assert finish == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 6,
                                                                   "total_tokens": 13}
    bad = httpx.post(url + "/v1/chat/completions", json={**body, "temperature": 9}, timeout=30)
    _assert_api_error(bad, 400, "temperature")  # errors found before generating stay plain JSON


def test_stream_sends_text_while_it_is_generated(app_server: tuple[str, ScriptedEngine]) -> None:
    """The first piece of text reaches the client while the generation still runs (held after that piece until
    the client has read it), and the pieces add up to the choice's text."""
    url, engine = app_server
    engine.mid_gate = threading.Event()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = (line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: "))
        role = json.loads(next(lines))
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        first = json.loads(next(lines))
        assert first["choices"][0]["delta"] == {"content": "answer"} and first["choices"][0]["finish_reason"] is None
        assert engine.active == 1  # still generating: the piece was sent before the end
        engine.mid_gate.set()
        rest = [json.loads(e) for e in lines if e != "[DONE]"]
    assert [c["choices"][0]["delta"] for c in rest] == [{"content": " 0"}, {}]
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_errors_before_and_after_the_first_piece(app_server: tuple[str, ScriptedEngine]) -> None:
    """An engine error before any text is a plain JSON error with its status; after text was sent (status 200
    already) it ends the stream with an OpenAI-shaped error event and no `[DONE]`; the error is counted."""
    url, engine = app_server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    engine.fail_at_start = ContextLengthError("prompt (9 tokens) + max_tokens (3) exceed the model's context")
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        resp.read()
    assert _assert_api_error(resp, 400, "context")["code"] == "context_length_exceeded"
    engine.fail_at_start = None
    engine.fail_after_text = ContextLengthError("late failure")
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = _events(resp)
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "context_length_exceeded"
    assert [json.loads(e)["choices"][0]["delta"] for e in events[:-1]] == [{"role": "assistant", "content": ""},
                                                                          {"content": "answer"}]
    assert httpx.get(url + "/health", timeout=10).json()["errors"] == 2


def test_a_streaming_client_that_leaves_stops_the_generation(app_server: tuple[str, ScriptedEngine]) -> None:
    """The client reads the first piece and closes the connection while the generation waits: the server notices,
    the engine's `should_stop` turns True, and the generation ends at its next token (1 of 32 taken)."""
    url, engine = app_server
    engine.mid_gate = threading.Event()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        lines = (line for line in resp.iter_lines() if line.startswith("data: "))
        next(lines), next(lines)  # the role chunk and the first piece
    _wait_for(lambda: engine.should_stop is not None and engine.should_stop(), "the server to see the client go")
    engine.mid_gate.set()
    _wait_for(lambda: engine.active == 0, "the generation to end")
    assert engine.tokens == 1


@pytest.mark.parametrize(("extra", "param"), [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
])
def test_unsupported_features_are_refused(app_server: tuple[str, ScriptedEngine], extra: dict[str, Any],
                                          param: str) -> None:
    """Finding 12: a feature the server cannot honour is a 400 naming the field, not silently ignored."""
    url, engine = app_server
    err = _assert_api_error(_post(url, {"messages": [{"role": "user", "content": "x"}], **extra}), 400, param)
    assert err["param"] == param and not engine.seen


def test_neutral_values_of_unsupported_features_are_accepted(app_server: tuple[str, ScriptedEngine]) -> None:
    url, _ = app_server
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": False, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}}
    assert _post(url, body).status_code == 200


def test_content_type_host_and_origin(app_server: tuple[str, ScriptedEngine]) -> None:
    """Finding 12: only JSON bodies, only a Host naming this server and no cross-origin callers: a web page in a
    local browser cannot drive the model (simple form posts, DNS rebinding, fetch from another origin)."""
    url, engine = app_server
    port = url.rsplit(":", 1)[1]
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
    assert _post_raw(url, body, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"):
        err = _assert_api_error(_post_raw(url, body, {} if ctype is None else {"Content-Type": ctype}), 415,
                                "application/json")
        assert err["code"] == "unsupported_media_type"
    json_ct = {"Content-Type": "application/json"}
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", f"localhost.:{port}x"):
        err = _assert_api_error(_post_raw(url, body, {**json_ct, "Host": host}), 400, "host")
        assert err["code"] == "invalid_host"
    _assert_api_error(httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=5), 400, "host")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert _post_raw(url, body, {**json_ct, "Host": host}).status_code == 200, host
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}", "https://localhost.evil:1"):
        err = _assert_api_error(_post_raw(url, body, {**json_ct, "Origin": origin}), 403, "origin")
        assert err["code"] == "forbidden_origin"
    assert _post_raw(url, body, {**json_ct, "Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    preflight = httpx.options(url + "/v1/chat/completions", timeout=5, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    calls = engine.calls
    assert calls == 5  # only the accepted requests reached the engine


def test_host_allowed() -> None:
    from vlrl.serve.app import host_allowed

    names = ("localhost", "127.0.0.1", "::1", "myhost")
    assert host_allowed("localhost:8000", names, 8000) and host_allowed("LOCALHOST", names, 8000)
    assert host_allowed("[::1]:8000", names, 8000) and host_allowed("myhost:8000", names, 8000)
    assert host_allowed("127.0.0.1:8000", names, None)
    for bad in ("localhost:8001", "evil:8000", "[::1]x:8000", "", "localhost:", "localhost:80:80", "::1:8000",
                "127.0.0.1:-8000", "127.0.0.1:8000 "):
        assert not host_allowed(bad, names, 8000), bad


def test_port_in_use_is_a_clear_error(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 12: a port already in use is `error: ...` naming it, exit 2, and no "serving on" line."""
    from vlrl import cli

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            code = cli.main(["serve", "--model", str(tiny_model_dir), "--port", str(port), "--log-level", "warning"])
        except SystemExit as exc:  # the CLI's argparse-style exit
            code = exc.code
    out = capsys.readouterr()
    assert code == 2, out
    assert "error:" in out.err and f"127.0.0.1:{port}" in out.err and "in use" in out.err
    assert "serving" not in out.out
