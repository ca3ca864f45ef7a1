"""The LLM-judge client against a scripted fake OpenAI endpoint (http.server on 127.0.0.1 in a thread) or a fake
transport (httpx.MockTransport): reply parsing, retries with backoff, time-outs, the step deadline, faults (slow,
5xx, garbage, refused), the cache, the concurrency limit, the registered rewards, and the API key: sent as a
Bearer token, never in logs, reprs, stats or cache files.

Waiting is never measured on the wall clock: the client gets a fake clock and sleep (`FakeTime`), which the fake
transport also advances to play a slow judge; real time appears only as generous bounds that detect a hang."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from vlrl.data.sample import Sample
from vlrl.rewards import RewardSpec, combine, get_reward, list_rewards
from vlrl.rewards.judge import (
    FAILURE_KINDS,
    JudgeClient,
    JudgeConfig,
    close_clients,
    judge_metrics,
    question_text,
)
from vlrl.rewards.judge_prompts import combine_accuracy, parse_score, parse_sub_scores, render

KEY = "sk-test-d0n0tl3ak-8812"
HANG_BOUND = 60.0  # seconds: only a hung client takes this long, however loaded the machine
Reply = tuple[int, str | None, dict[str, str]]  # (status, body or None = hang, headers)


def ok(content: str) -> Reply:
    body = {"id": "x", "object": "chat.completion", "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    return 200, json.dumps(body), {}


class FakeJudge:
    """A scripted chat-completions endpoint. `responder(request_json, attempt)` -> Reply, where attempt counts
    earlier requests with the same user text (0 for the first)."""

    def __init__(self) -> None:
        self.responder: Callable[[dict[str, Any], int], Reply] = lambda req, attempt: ok("<answer>0.7</answer>")
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.delay = 0.0
        self.gather = 0  # hold each request until this many are in flight at once (or HANG_BOUND passed)
        self.gathered = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                text = body["messages"][1]["content"][0]["text"]
                with fake.lock:
                    attempt = sum(1 for _, b in fake.requests if b["messages"][1]["content"][0]["text"] == text)
                    fake.requests.append((dict(self.headers.items()), body))
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                    if fake.gather and fake.inflight >= fake.gather:
                        fake.gathered.set()
                try:
                    if fake.gather:
                        fake.gathered.wait(timeout=HANG_BOUND)
                    time.sleep(fake.delay)
                    status, payload, headers = fake.responder(body, attempt)
                    if payload is None:  # hang past the client's time-out
                        fake.release.wait(timeout=HANG_BOUND)
                        return
                    data = payload.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake() -> Iterator[FakeJudge]:
    server = FakeJudge()
    yield server
    server.close()


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (10, 120, 200)).save(path)
    return str(path)


def make_samples(n: int, image: str | None, **metadata: Any) -> list[Sample]:
    return [Sample(id=f"s{i}", images=[image] if image else [],
                   messages=[{"role": "user", "content": f"<image>How many circles? ({i})"}] if image else
                   [{"role": "user", "content": f"What is {i} + 1?"}],
                   answer=str(i + 1), problem_type="numerical", metadata=dict(metadata)) for i in range(n)]


def completions(n: int) -> list[str]:
    return [f"<think>Counting step by step: {i} plus one.</think><answer>{i + 1}</answer>" for i in range(n)]


def config(fake: FakeJudge, **kw: Any) -> JudgeConfig:
    base: dict[str, Any] = dict(base_url=fake.base_url, model="judge", timeout=5.0, max_retries=2, backoff=0.05,
                                max_concurrency=4)
    base.update(kw)
    return JudgeConfig(**base)


class FakeTime:
    """The client's clock and sleep: time moves only when the client sleeps or a fake judge `spend`s it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def clock(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def spend(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def chat_body(content: Any) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def faulty_client(handler: Callable[[httpx.Request], httpx.Response], t: FakeTime, **kw: Any) -> JudgeClient:
    """A client whose requests go to `handler` (no network) and whose waits go to `t`."""
    base: dict[str, Any] = dict(base_url="http://judge.invalid/v1", model="judge", timeout=10.0, max_retries=3,
                                backoff=1.0, max_backoff=30.0, max_concurrency=1, step_timeout=600.0)
    base.update(kw)
    return JudgeClient(JudgeConfig(**base), clock=t.clock, sleep=t.sleep, transport=httpx.MockTransport(handler))


def assert_failures_add_up(stats: dict[str, float]) -> None:
    """Every item without a reply is counted under exactly one cause."""
    assert stats["failures"] == sum(stats[k] for k in FAILURE_KINDS)


# ----------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<answer>0.8</answer>", 0.8),
        ("<think>maybe 0.2</think>\n<answer> 0.9 </answer>", 0.9),
        ("<answer>7/10</answer>", 0.7),
        ("Score: 0.8", 0.8),
        ("The final score is **0.6**.", 0.6),
        ("rating = 85%", 0.85),
        ("0.3", 0.3),
        ("  1  ", 1.0),
        ("8/10", 0.8),
        ("I would give it 8 out of 10.", 0.8),
        ("\\boxed{0.4}", 0.4),
        ("<answer>great</answer> score: 0.2", 0.2),
        ("Score: 1.7", 1.0),
        ("-0.4", 0.0),
        ("5/0", None),
        ("303 616 44 gibberish", None),
        ("", None),
        ("<answer></answer>", None),
    ],
)
def test_parse_score(reply: str, expected: float | None) -> None:
    got = parse_score(reply)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_score_is_bounded_on_long_replies() -> None:
    t0 = time.monotonic()
    assert parse_score("{" * 50_000 + "1/" * 50_000 + "<answer>" * 10_000) is None
    assert time.monotonic() - t0 < HANG_BOUND  # catastrophic backtracking would take hours


def test_accuracy_sub_scores_and_weights() -> None:
    assert parse_sub_scores('Sure! {"format": 1, "reasoning": 0.5, "answer": 0}') == {
        "format": 1.0, "reasoning": 0.5, "answer": 0.0}
    assert parse_sub_scores("Format: 1\nThinking: 0.4\n**Accuracy**: 8/10") == {
        "format": 1.0, "reasoning": 0.4, "answer": 0.8}
    assert parse_sub_scores('{"format": 2, "answer": -1, "reasoning": true}') == {"format": 1.0, "answer": 0.0}
    assert combine_accuracy({"format": 1.0, "reasoning": 0.5, "answer": 0.0}, (0.1, 0.3, 0.6)) == pytest.approx(0.25)
    assert combine_accuracy({"format": 1.0, "reasoning": 0.5, "answer": 1.0}, (1, 1, 2)) == pytest.approx(0.875)
    assert combine_accuracy({"format": 1.0, "answer": 1.0}, (0.1, 0.3, 0.6)) is None  # reasoning missing
    assert combine_accuracy({"answer": 1.0}, (0, 0, 1)) == 1.0  # zero-weight keys may be missing


def test_render_substitutes_once_and_follows_the_rubric() -> None:
    text = render("process", question="Q {response}", response="R {question} {answer}")
    assert "Question: Q {response}\nReasoning process: R {question} {answer}\n" in text
    for criterion in ("Logical Soundness", "Correct Reasoning", "Error Identification", "Language Consistency",
                      "Redundancy"):
        assert f"**{criterion}**" in text
    assert "{0, 0.1, 0.2, ..., 1.0}" in text and "<answer>your_score</answer>" in text
    with pytest.raises(ValueError, match="valid: process, accuracy"):
        render("nope", question="", response="")


def test_question_text_adds_image_placeholder() -> None:
    s = Sample(id="a", images=["/x.png"], messages=[{"role": "system", "content": "sys"},
                                                   {"role": "user", "content": "What?"}], answer="", problem_type="free_form")
    assert question_text(s) == "<image> What?"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="http"):
        JudgeConfig(base_url="ftp://x", model="m")
    with pytest.raises(ValueError, match="weights"):
        JudgeConfig(base_url="http://x", model="m", weights=(0.0, 0.0, 0.0))
    assert JudgeConfig(base_url="http://h/v1/", model="m").url == "http://h/v1/chat/completions"


# ----------------------------------------------------------------------------------------- client
def test_scores_and_sends_the_key_only_as_bearer(fake: FakeJudge, image_path: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("VLRL_JUDGE_API_KEY", KEY)
    cache = tmp_path / "cache.jsonl"
    with JudgeClient(config(fake, cache_path=str(cache))) as client:
        values = client.score(completions(3), make_samples(3, image_path))
        # a failure path logs too: the key must not appear there either
        fake.responder = lambda req, attempt: (500, '{"error": {"message": "boom"}}', {})
        assert client.score(["other"], make_samples(1, image_path)) == [None]
        visible = [repr(client), str(client), repr(client.config), repr(client.stats), repr(vars(client)),
                   json.dumps(client.stats.as_dict())]
        with pytest.raises(TypeError):
            pickle.dumps(client._api_key)
    assert values == [0.7, 0.7, 0.7]
    assert len(fake.requests) == 3 + 3
    texts = [body["messages"][1]["content"][0]["text"] for _, body in fake.requests]
    assert any("Reasoning process: <think>Counting step by step: 0 plus one." in t for t in texts)
    for headers, body in fake.requests:
        assert headers["Authorization"] == f"Bearer {KEY}"
        assert body["model"] == "judge" and body["temperature"] == 0.0
        text_part, image_part = body["messages"][1]["content"]
        assert "Logical Soundness" in text_part["text"] and "Question: <image>How many circles?" in text_part["text"]
        assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    for text in [*visible, cache.read_text(), caplog.text]:
        assert KEY not in text
    assert "judge call failed" in caplog.text


def test_no_key_no_authorization_header(fake: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLRL_JUDGE_API_KEY", raising=False)
    with JudgeClient(config(fake)) as client:
        assert client.score(completions(1), make_samples(1, None)) == [0.7]
    assert "Authorization" not in fake.requests[0][0]


def test_retries_5xx_with_backoff(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (503, "overloaded", {}) if attempt == 0 else ok("Score: 0.4")
    t = FakeTime()
    with JudgeClient(config(fake, backoff=0.2, max_concurrency=2), clock=t.clock, sleep=t.sleep) as client:
        values = client.score(completions(2), make_samples(2, None))
    assert values == [0.4, 0.4]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"]) == (4, 2, 0)
    assert len(t.sleeps) == 2 and all(0.2 <= s <= 0.22 for s in t.sleeps)  # one backoff each (+ <= 10 % jitter)


def test_retry_after_header_and_429(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (429, "slow down", {"Retry-After": "0"}) if attempt < 2 else ok("0.5")
    t = FakeTime()
    with JudgeClient(config(fake, backoff=5.0), clock=t.clock, sleep=t.sleep) as client:
        assert client.score(completions(1), make_samples(1, None)) == [0.5]
    assert t.sleeps == [0.0, 0.0]  # Retry-After: 0 beat the 5 s backoff
    assert client.stats.retries == 2


def test_no_retry_on_4xx(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (400, '{"error": {"message": "bad request"}}', {})
    with JudgeClient(config(fake)) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (1, 0, 1)


def test_retries_exhausted(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (500, "always broken", {})
    with JudgeClient(config(fake, max_retries=2, backoff=0.01)) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (3, 2, 1)


def test_timeout_gives_none_and_is_counted(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (200, None, {})  # hang (until the fake closes)
    t = FakeTime()
    with JudgeClient(config(fake, timeout=0.3, max_retries=1, backoff=0.01), clock=t.clock, sleep=t.sleep) as client:
        t0 = time.monotonic()
        assert client.score(completions(2), make_samples(2, None)) == [None, None]
        assert time.monotonic() - t0 < HANG_BOUND  # the read time-out fired, not the fake's release
    stats = client.stats.as_dict()
    assert (stats["failures"], stats["timeouts"], stats["calls"], stats["retries"]) == (2, 2, 4, 2)


def test_malformed_response_is_retried_then_none(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (200, "<html>not json</html>", {})
    t = FakeTime()
    with JudgeClient(config(fake, max_retries=2), clock=t.clock, sleep=t.sleep) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    assert (client.stats.calls, client.stats.retries, client.stats.failures, client.stats.malformed) == (3, 2, 1, 1)


def test_unparsable_reply_is_none_and_counted(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: ok("I cannot rate this.")
    with JudgeClient(config(fake)) as client:
        assert client.score(completions(2), make_samples(2, None)) == [None, None]
    assert (client.stats.unparsable, client.stats.failures) == (2, 0)


def test_connection_refused_is_retried_and_counted(fake: FakeJudge) -> None:
    url = fake.base_url
    fake.close()
    cfg = JudgeConfig(base_url=url, model="judge", timeout=30.0, max_retries=2, backoff=0.5)
    t = FakeTime()
    with JudgeClient(cfg, clock=t.clock, sleep=t.sleep) as client:
        assert client.score(completions(3), make_samples(3, None)) == [None] * 3
    stats = client.stats.as_dict()
    assert (stats["failures"], stats["retries"], stats["timeouts"], stats["connection_errors"]) == (3, 6, 0, 3)
    assert sorted(t.sleeps) == pytest.approx([0.5] * 3 + [1.0] * 3, rel=0.1)  # backoff 0.5, then 1.0


def test_unreadable_image_is_none_without_a_call(fake: FakeJudge, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with JudgeClient(config(fake)) as client:
        assert client.score(completions(1), make_samples(1, str(bad))) == [None]
    assert (client.stats.failures, client.stats.calls, len(fake.requests)) == (1, 0, 0)


def test_cache_hits_in_memory_and_from_file(fake: FakeJudge, image_path: str, tmp_path: Path) -> None:
    cache = tmp_path / "judge" / "cache.jsonl"
    comps, samples = completions(4), make_samples(4, image_path)
    with JudgeClient(config(fake, cache_path=str(cache))) as client:
        first = client.score(comps, samples)
        assert len(fake.requests) == 4
        assert client.score(comps, samples) == first
        assert len(fake.requests) == 4 and client.stats.cache_hits == 4 and client.stats.calls == 4
    with JudgeClient(config(fake, cache_path=str(cache))) as reloaded:
        assert reloaded.score(comps, samples) == first
    assert len(fake.requests) == 4 and reloaded.stats.cache_hits == 4 and reloaded.stats.calls == 0
    assert len(cache.read_text().splitlines()) == 4
    with JudgeClient(config(fake, cache_path=str(cache), model="other-judge")) as other:
        other.score(comps[:1], samples[:1])  # another judge model: not a hit
    assert other.stats.cache_hits == 0 and len(fake.requests) == 5


def test_concurrency_is_limited(fake: FakeJudge) -> None:
    fake.gather, fake.delay = 2, 0.05  # the first two requests wait for each other: overlap is certain
    t = FakeTime()
    with JudgeClient(config(fake, max_concurrency=2), clock=t.clock, sleep=t.sleep) as client:
        assert client.score(completions(6), make_samples(6, None)) == [0.7] * 6
    assert fake.max_inflight == 2
    assert client.stats.seconds == 0.0  # measured on the client's clock, which no sleep moved


def test_accuracy_template(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: ok('{"format": 1.0, "reasoning": 0.5, "answer": 1.0}')
    with JudgeClient(config(fake, weights=(0.2, 0.2, 0.6))) as client:
        values = client.score(completions(1), make_samples(1, None), template="accuracy")
    assert values == [pytest.approx(0.9)]
    text = fake.requests[0][1]["messages"][1]["content"][0]["text"]
    assert "Ground-truth answer: 1\n" in text and "<response><think>" in text


# ----------------------------------------------------------------------------------------- faults
def test_backoff_doubles_up_to_its_cap_without_real_waiting() -> None:
    t = FakeTime()
    with faulty_client(lambda req: httpx.Response(503, text="overloaded"), t, max_retries=4, backoff=1.0,
                       max_backoff=3.0) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"], stats["http_errors"]) == (5, 4, 1, 1)
    assert [round(s) for s in t.sleeps] == [1, 2, 3, 3]  # min(max_backoff, backoff * 2**k), + <= 10 % jitter
    assert all(base <= s <= 1.1 * base for s, base in zip(t.sleeps, [1, 2, 3, 3]))
    assert stats["seconds"] == pytest.approx(sum(t.sleeps))
    assert_failures_add_up(stats)


@pytest.mark.parametrize(
    ("name", "response"),
    [
        ("not json", lambda: httpx.Response(200, text="<html>502 Bad Gateway</html>")),
        ("json, no choices", lambda: httpx.Response(200, json={"object": "chat.completion"})),
        ("content not text", lambda: httpx.Response(200, content=chat_body({"score": 0.5}))),
        ("enormous body", lambda: httpx.Response(200, content=b"x" * (5 * 1024 * 1024))),
        ("5xx", lambda: httpx.Response(500, json={"error": {"message": "boom"}})),
    ],
)
def test_garbage_is_retried_counted_and_none(name: str, response: Callable[[], httpx.Response]) -> None:
    t = FakeTime()
    with faulty_client(lambda req: response(), t, max_retries=2, backoff=0.5) as client:
        assert client.score(completions(2), make_samples(2, None)) == [None, None]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"]) == (6, 4, 2), name
    assert stats["http_errors" if name == "5xx" else "malformed"] == 2
    assert len(t.sleeps) == 4
    assert_failures_add_up(stats)


@pytest.mark.parametrize("reply", ["I cannot rate this.", "<answer>good</answer>", '{"reasoning": "fine"}'])
def test_reply_without_a_score_is_none_not_retried(reply: str) -> None:
    """A well-formed reply without a score is the judge's answer (deterministic at temperature 0, and cached):
    counted as unparsable, not re-requested."""
    t = FakeTime()
    with faulty_client(lambda req: httpx.Response(200, content=chat_body(reply)), t) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"], stats["unparsable"]) == (1, 0, 0, 1)


def test_slow_and_refusing_judges_are_retried_then_recover() -> None:
    """Attempt 1 times out (the judge sat past `timeout`), attempt 2 is refused, attempt 3 answers."""
    t = FakeTime()
    attempts: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            t.spend(10.0)
            raise httpx.ReadTimeout("no reply", request=req)
        if len(attempts) == 2:
            raise httpx.ConnectError("connection refused", request=req)
        return httpx.Response(200, content=chat_body("<answer>0.6</answer>"))

    with faulty_client(handler, t, timeout=10.0, max_retries=3, backoff=1.0) as client:
        assert client.score(completions(1), make_samples(1, None)) == [0.6]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"]) == (3, 2, 0)
    assert [round(s) for s in t.sleeps] == [1, 2]


def test_a_reply_that_trickles_past_the_timeout_is_cut_and_retried() -> None:
    """Each chunk arrives within the read time-out, but the whole body takes longer than `timeout`."""
    t = FakeTime()

    def trickle() -> Iterator[bytes]:
        for _ in range(100):
            t.spend(0.4)
            yield b" "

    with faulty_client(lambda req: httpx.Response(200, content=trickle()), t, timeout=1.0, max_retries=1,
                       backoff=0.1) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    stats = client.stats.as_dict()
    assert (stats["calls"], stats["retries"], stats["failures"], stats["timeouts"]) == (2, 1, 1, 1)
    assert t.now - 1000.0 < 2 * (1.0 + 0.4) + 0.2  # each attempt cut at its time-out, not after 40 s


def test_step_deadline_bounds_retries_and_backoff() -> None:
    """With 10 retries of backoff 1, 2, 4, ... the item would wait over 17 minutes; the step deadline of 5 s
    stops it at the first backoff that would end past the deadline."""
    t = FakeTime()
    with faulty_client(lambda req: httpx.Response(503), t, max_retries=10, backoff=1.0, max_backoff=600.0,
                       step_timeout=5.0) as client:
        assert client.score(completions(1), make_samples(1, None)) == [None]
    stats = client.stats.as_dict()
    assert t.now - 1000.0 <= 5.0 and sum(t.sleeps) <= 5.0
    assert (stats["calls"], stats["failures"], stats["over_deadline"], stats["http_errors"]) == (3, 1, 1, 0)
    assert_failures_add_up(stats)


def test_step_deadline_bounds_a_slow_judge_over_many_items() -> None:
    """A judge that takes 4 s per reply, 10 items one at a time, step deadline 9 s: two items are judged,
    each call's time-out is cut to the time left (9, 5, then 1 s: too short), the rest are not sent."""
    t = FakeTime()
    timeouts: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        read = req.extensions["timeout"]["read"]
        timeouts.append(read)
        if read < 4.0:
            t.spend(read)
            raise httpx.ReadTimeout("judge too slow", request=req)
        t.spend(4.0)
        return httpx.Response(200, content=chat_body("<answer>0.5</answer>"))

    with faulty_client(handler, t, timeout=30.0, max_retries=3, step_timeout=9.0) as client:
        values = client.score(completions(10), make_samples(10, None))
    stats = client.stats.as_dict()
    assert values == [0.5, 0.5] + [None] * 8
    assert timeouts == pytest.approx([9.0, 5.0, 1.0])
    assert t.now - 1000.0 == pytest.approx(9.0)
    assert (stats["calls"], stats["retries"], stats["failures"], stats["over_deadline"]) == (3, 0, 8, 8)
    assert_failures_add_up(stats)


def test_hung_judge_never_stalls_a_step_past_its_deadline(fake: FakeJudge) -> None:
    """Real time: a judge that never answers, a 60 s call time-out and 3 retries (minutes of waiting), but a
    step deadline of 0.5 s: `score` returns within a bound that only a hang exceeds."""
    fake.responder = lambda req, attempt: (200, None, {})
    cfg = config(fake, timeout=60.0, max_retries=3, backoff=5.0, max_concurrency=2, step_timeout=0.5)
    with JudgeClient(cfg) as client:
        out: list[list[float | None]] = []
        worker = threading.Thread(target=lambda: out.append(client.score(completions(4), make_samples(4, None))))
        worker.start()
        worker.join(timeout=HANG_BOUND / 2)
        stalled = worker.is_alive()
        fake.release.set()  # free a stalled client so the test ends either way
        worker.join()
    assert not stalled, "score() ran far past its step deadline"
    assert out == [[None] * 4]
    stats = client.stats.as_dict()
    assert stats["failures"] == 4 and stats["over_deadline"] + stats["timeouts"] == 4
    assert_failures_add_up(stats)


def test_judge_metrics_name_every_counter(fake: FakeJudge) -> None:
    fake.responder = lambda req, attempt: (503, "down", {})
    settings = {"base_url": fake.base_url, "model": "judge", "max_retries": 0}
    try:
        get_reward("judge_process")(completions(1), make_samples(1, None), **settings)
        metrics = judge_metrics()
    finally:
        close_clients()
    expected = {"requests", "cache_hits", "calls", "retries", "failures", "unparsable", "seconds", *FAILURE_KINDS}
    assert set(metrics) == {f"judge/{k}" for k in expected}
    assert metrics["judge/failures"] == metrics["judge/http_errors"] == 1


# ----------------------------------------------------------------------------------------- registry
def test_registered_judge_rewards(fake: FakeJudge, image_path: str) -> None:
    assert {"judge", "judge_process", "judge_accuracy"} <= set(list_rewards())
    with pytest.raises(ValueError, match="no parameter"):
        RewardSpec("judge_process", kwargs={"base_url": fake.base_url, "modle": "typo"})

    def responder(req: dict[str, Any], attempt: int) -> Reply:
        text = req["messages"][1]["content"][0]["text"]
        return ok('{"format": 1, "reasoning": 1, "answer": 0}') if "Ground-truth" in text else ok("<answer>0.3</answer>")

    fake.responder = responder
    settings = {"base_url": fake.base_url, "model": "judge", "timeout": 5.0, "backoff": 0.01}
    try:
        samples = make_samples(2, image_path) + make_samples(2, None, judge_template="accuracy")
        mixed = get_reward("judge")(completions(4), samples, **settings, completion_lengths=[1, 2, 3, 4])
        assert mixed == [0.3, 0.3, pytest.approx(0.4), pytest.approx(0.4)]
        specs = [RewardSpec("judge_process", kwargs=settings),
                 RewardSpec("judge_accuracy", weight=0.5, kwargs={**settings, "weights": [0, 0, 1]})]
        total, per_reward, metrics = combine(specs, completions(2), make_samples(2, image_path))
        assert per_reward["judge_process"] == [0.3, 0.3] and per_reward["judge_accuracy"] == [0.0, 0.0]
        assert total == [pytest.approx(0.3)] * 2 and metrics["reward/judge_process/none"] == 0
        assert judge_metrics()["judge/requests"] == 8
        with pytest.raises(ValueError, match="base_url and model"):
            get_reward("judge_process")(completions(1), make_samples(1, None))
    finally:
        close_clients()
