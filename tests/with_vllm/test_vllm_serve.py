"""`vlrl serve --engine vllm` on the tiny model (`make test-vllm`): one server with a colocated vLLM worker for the
file. Its greedy answers (an image as a data URL; literal "<image>" text) are the `hf`-served ones; a long request
whose client goes away is cancelled and the next request is answered as before; SIGTERM stops the server and its
worker."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

WORKER_MARK = "vllm_worker"  # in a worker's command line: the engine runs src/vlrl/rollout/vllm_worker by path
LIMITS = ["--max-tokens-cap", "3500", "--max-generation-seconds", "600", "--log-level", "warning"]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(model_dir: Path, log_path: Path, extra: list[str], startup: float) -> Server:
    """`vlrl serve` of `model_dir` on a free loopback port, once /health answers (else the test fails with its log)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vlrl.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", "tiny", *LIMITS, *extra]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + startup
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlrl serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"vlrl serve did not answer /health within {startup:.0f}s:\n{server.log()}")


def _children(pid: int) -> dict[int, str]:
    """The live child processes of `pid` (from /proc): pid -> command line."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry.name)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


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


def _answer(server: Server, body: dict[str, Any]) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt tokens, completion tokens) of a one-choice completion."""
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600.0)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log()}"
    data = r.json()
    choice = data["choices"][0]
    return (choice["message"]["content"], choice["finish_reason"], data["usage"]["prompt_tokens"],
            data["usage"]["completion_tokens"])


@pytest.fixture(scope="module")
def varied_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights jittered (fixed seed), saved: its greedy answers vary from token to token
    (the untouched random model repeats one token)."""
    from vlrl.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("varied") / "tiny"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_answers(varied_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, int, int]]:
    """The `hf`-served greedy answers to REQUESTS (that server is stopped before the vLLM one starts)."""
    server = _serve(varied_dir, tmp_path_factory.mktemp("hf") / "server.log", [], startup=300)
    try:
        return [_answer(server, body) for body in REQUESTS]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vllm_server(varied_dir: Path, vllm_python: str, tmp_path_factory: pytest.TempPathFactory,
                hf_answers: Any) -> Iterator[Server]:
    server = _serve(varied_dir, tmp_path_factory.mktemp("vllm") / "server.log",
                    ["--engine", "vllm", "--vllm-python", vllm_python], startup=900)
    workers = [pid for pid, cmd in _children(server.proc.pid).items() if WORKER_MARK in cmd]
    yield server
    server.stop()
    for pid in workers:  # a worker the server left behind (the last test asserts there is none)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_greedy_answers_equal_the_hf_served_ones(vllm_server: Server, hf_answers: list[tuple[str, str, int, int]]):
    got = [_answer(vllm_server, body) for body in REQUESTS]
    assert got == hf_answers
    assert len({text for text, *_ in got}) == len(got) and all(text for text, *_ in got)


def test_a_request_whose_client_goes_is_cancelled_and_the_next_is_answered(vllm_server: Server,
                                                                          hf_answers: list[tuple[str, str, int, int]]):
    long = _body(REQUESTS[0]["messages"][0]["content"], max_tokens=3000, temperature=1.0, n=4)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after about a second and closes its connection
        httpx.post(vllm_server.url + "/v1/chat/completions", json=long, timeout=httpx.Timeout(60.0, read=1.0))
    assert _answer(vllm_server, REQUESTS[0]) == hf_answers[0]
    health = httpx.get(vllm_server.url + "/health", timeout=10.0).json()
    assert health["busy"] is False and health["waiting"] == 0


def test_sigterm_stops_the_server_and_its_worker(vllm_server: Server):
    workers = [pid for pid, cmd in _children(vllm_server.proc.pid).items() if WORKER_MARK in cmd]
    assert len(workers) == 1, _children(vllm_server.proc.pid)
    code = vllm_server.stop()
    deadline = time.monotonic() + 60
    while _alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(workers[0]), f"the vLLM worker outlived the server (exit {code}):\n{vllm_server.log()}"
    assert code == 128 + signal.SIGTERM, vllm_server.log()
