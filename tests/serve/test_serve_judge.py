"""The judge client against `vlrl serve` of the tiny model: real HTTP, real (random) replies, the cache, and a
server killed in the middle of a batch."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import Served, start_server

from vlrl.data.sample import Sample
from vlrl.rewards import get_reward
from vlrl.rewards.judge import JudgeClient, JudgeConfig, close_clients

pytestmark = pytest.mark.slow


def _samples(n: int, image: str) -> list[Sample]:
    return [Sample(id=f"q{i}", images=[image], messages=[{"role": "user", "content": "<image>How many shapes?"}],
                   answer="3", problem_type="numerical") for i in range(n)]


def _completions(n: int) -> list[str]:
    return [f"<think>I see {i} red shapes and count them.</think><answer>{i}</answer>" for i in range(n)]


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "shapes.png"
    Image.new("RGB", (56, 56), (200, 30, 30)).save(path)
    return str(path)


def _completions_served(served: Served) -> int:
    return int(httpx.get(served.url + "/health", timeout=5).json()["completions"])


def test_judge_against_served_tiny_model(served: Served, image: str) -> None:
    cfg = JudgeConfig(base_url=served.url + "/v1", model="tiny", max_tokens=8, timeout=30.0, max_retries=1,
                      backoff=0.05, max_concurrency=2)
    with JudgeClient(cfg) as client:
        values = client.score(_completions(4), _samples(4, image))
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
        stats = client.stats.as_dict()
        assert (stats["requests"], stats["calls"], stats["failures"]) == (4, 4, 0)
        assert stats["unparsable"] == sum(v is None for v in values)  # a random model rarely emits a score
        served_before = _completions_served(served)
        assert client.score(_completions(4), _samples(4, image)) == values
        assert client.stats.cache_hits == 4 and client.stats.calls == 4
        assert _completions_served(served) == served_before  # no new HTTP request reached the server
    for template in ("accuracy",):
        with JudgeClient(cfg) as client:
            out = client.score(_completions(1), _samples(1, image), template=template)
        assert out[0] is None or 0.0 <= out[0] <= 1.0


def test_registered_reward_against_served_model(served: Served, image: str) -> None:
    try:
        values = get_reward("judge_process")(_completions(2), _samples(2, image), base_url=served.url + "/v1",
                                             model="tiny", max_tokens=4, timeout=30.0)
        assert len(values) == 2 and all(v is None or 0.0 <= v <= 1.0 for v in values)
    finally:
        close_clients()


def test_server_killed_mid_batch(tiny_model_dir: Path, tmp_path: Path, image: str) -> None:
    server = start_server(tiny_model_dir, tmp_path / "server.log")
    try:
        cfg = JudgeConfig(base_url=server.url + "/v1", model="tiny", max_tokens=32, timeout=30.0, max_retries=2,
                          backoff=0.05, max_concurrency=1)
        client = JudgeClient(cfg)
        out: list[list[float | None]] = []
        worker = threading.Thread(target=lambda: out.append(client.score(_completions(8), _samples(8, image))))
        worker.start()
        deadline = time.monotonic() + 60
        while client.stats.calls < 3 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.is_alive(), "the batch finished before the server could be killed"
        server.proc.send_signal(signal.SIGKILL)
        worker.join(timeout=60)  # bounds only a hang: the remaining calls are refused at once
        assert not worker.is_alive()
        values = out[0]
        stats = client.stats.as_dict()
        assert values[-1] is None and stats["failures"] >= 1
        assert stats["connection_errors"] == stats["failures"] and stats["timeouts"] == 0  # refused, not waited on
        assert stats["retries"] <= 2 * stats["requests"]  # bounded retries
        assert stats["failures"] + stats["unparsable"] == sum(v is None for v in values)
        assert stats["requests"] == 8
        client.close()
    finally:
        server.stop()
