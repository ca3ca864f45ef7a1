"""The app with a scripted engine under uvicorn in a thread (fast, no model): generation is serialised, the
queue is bounded (429), engine errors keep OpenAI's error shape; plus the CLI's argument parsing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
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
        self.fail: Exception | None = None
        self.active = 0
        self.max_active = 0
        self.seen: list[tuple[Sample, list[Image.Image], SamplingParams, list[str]]] = []
        self._lock = threading.Lock()

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None) -> GenerationResult:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if self.gate is not None:
                assert self.gate.wait(timeout=30)
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
