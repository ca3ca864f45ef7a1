"""`vlrl serve --engine vllm` on the tiny model (`make test-vllm`): one server with a colocated vLLM worker for the
file. Its greedy answers (an image as a data URL; literal "<image>" text) are the `hf`-served ones; a long request
whose client goes away is cancelled and the next request is answered as before; SIGTERM stops the server and its
worker."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from proc_tree import alive, children
from serve_helpers import Served, start_server

pytestmark = pytest.mark.slow

WORKER_MARK = "vllm_worker"  # in a worker's command line: the engine runs src/vlrl/rollout/vllm_worker by path
LIMITS = ["--max-tokens-cap", "3500", "--max-generation-seconds", "600", "--log-level", "warning"]


def _serve(model_dir: Path, log_path: Path, extra: list[str], startup: float) -> Served:
    """`vlrl serve` of `model_dir` with this file's limits, once /health answers."""
    return start_server(model_dir, log_path, [*LIMITS, *extra], startup_seconds=startup)




def _data_url() -> str:
    image = Image.new("RGB", (84, 56), (240, 240, 240))
    for x in range(10, 30):
        for y in range(12, 40):
            image.putpixel((x, y), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(content: Any, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "seed": 5, **extra}


REQUESTS = [  # an image with a question; text that mentions "<image>" without being one
    _body([{"type": "image_url", "image_url": {"url": _data_url()}}, {"type": "text", "text": "How many shapes?"}]),
    _body("Say <image> literally, then count: 1 2 3"),
]


def _answer(server: Served, body: dict[str, Any]) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt tokens, completion tokens) of a one-choice completion."""
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600.0)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log()}"
    data = r.json()
    choice = data["choices"][0]
    return (choice["message"]["content"], choice["finish_reason"], data["usage"]["prompt_tokens"],
            data["usage"]["completion_tokens"])



@pytest.fixture(scope="module")
def hf_answers(varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, int, int]]:
    """The `hf`-served greedy answers to REQUESTS (that server is stopped before the vLLM one starts)."""
    server = _serve(varied_model_dir, tmp_path_factory.mktemp("hf") / "server.log", [], startup=300)
    try:
        return [_answer(server, body) for body in REQUESTS]
    finally:
        server.stop(timeout=120)


@pytest.fixture(scope="module")
def vllm_server(varied_model_dir: Path, vllm_python: str, tmp_path_factory: pytest.TempPathFactory,
                hf_answers: Any) -> Iterator[Served]:
    server = _serve(varied_model_dir, tmp_path_factory.mktemp("vllm") / "server.log",
                    ["--engine", "vllm", "--vllm-python", vllm_python], startup=900)
    workers = [pid for pid, cmd in children(server.proc.pid).items() if WORKER_MARK in cmd]
    yield server
    server.stop(timeout=120)
    for pid in workers:  # a worker the server left behind (the last test asserts there is none)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_greedy_answers_equal_the_hf_served_ones(vllm_server: Served, hf_answers: list[tuple[str, str, int, int]]):
    got = [_answer(vllm_server, body) for body in REQUESTS]
    assert got == hf_answers
    assert len({text for text, *_ in got}) == len(got) and all(text for text, *_ in got)
    body = {**REQUESTS[1], "stream": True}  # streamed: the vllm engine gives the text whole, the same text
    with httpx.stream("POST", vllm_server.url + "/v1/chat/completions", json=body, timeout=600.0) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == hf_answers[1][0]
    assert chunks[-1]["finish_reason"] == hf_answers[1][1]


def test_a_request_whose_client_goes_is_cancelled_and_the_next_is_answered(vllm_server: Served,
                                                                          hf_answers: list[tuple[str, str, int, int]]):
    long = _body(REQUESTS[0]["messages"][0]["content"], max_tokens=3000, temperature=1.0, n=4)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after about a second and closes its connection
        httpx.post(vllm_server.url + "/v1/chat/completions", json=long, timeout=httpx.Timeout(60.0, read=1.0))
    assert _answer(vllm_server, REQUESTS[0]) == hf_answers[0]
    health = httpx.get(vllm_server.url + "/health", timeout=10.0).json()
    assert health["busy"] is False and health["waiting"] == 0


def test_sigterm_stops_the_server_and_its_worker(vllm_server: Served):
    workers = [pid for pid, cmd in children(vllm_server.proc.pid).items() if WORKER_MARK in cmd]
    assert len(workers) == 1, children(vllm_server.proc.pid)
    code = vllm_server.stop(timeout=120)
    deadline = time.monotonic() + 60
    while alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(workers[0]), f"the vLLM worker outlived the server (exit {code}):\n{vllm_server.log()}"
    assert code == 128 + signal.SIGTERM, vllm_server.log()
