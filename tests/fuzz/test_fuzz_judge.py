"""Fuzzing the LLM judge (`rewards.judge`, `rewards.judge_prompts`): hostile judge replies (any text, numbers in
odd forms, many scores, huge replies) give a score in [0, 1] or None, never an exception; prompts render any
question, response and answer verbatim, substituted once; and the client, fed any HTTP status, header and body
by a fake transport, returns one value in range or None per item, counts each failure under one cause and keeps
to its step deadline (on a fake clock: no real waiting)."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
from fuzzing import fuzz_settings, limits
from hypothesis import event, given
from hypothesis import strategies as st

from vlrl.data.sample import Sample
from vlrl.rewards.judge import FAILURE_KINDS, JudgeClient, JudgeConfig
from vlrl.rewards.judge_prompts import _FIELD, _TEMPLATE_TEXT, TEMPLATES, parse_reply, parse_score, render

# any code point, lone surrogates included (JSON can carry them: "\ud800")
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=300)

_DIGITS = st.sampled_from(["0", "1", "7", "10", "100", "0.5", ".5", "5.", "1e3", "1e-400", "1e309", "-0", "+.8",
                           "0x10", "1_000", "٠.٥", "０.８", "½", "nan", "inf", "-inf", "9" * 40, "0." + "0" * 30 + "1",
                           "", ".", "-", "8/10", "8 out of 10", "80%", "5/0", "0/0", "-3/-4", "1/" * 20])
NUMBER = st.one_of(
    _DIGITS,
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: f"{x:e}"),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.tuples(st.integers(-100, 100), st.integers(-100, 100)).map(lambda ab: f"{ab[0]}/{ab[1]}"),
)
WRAPPED = st.tuples(st.sampled_from(["<answer>{}</answer>", "\\boxed{{{}}}", "Score: {}", "rating = **{}**.",
                                     "{}", "I give it {} overall", "<answer>Score: {}</answer>", "{} out of 10",
                                     '{{"format": {}, "reasoning": {}, "answer": {}}}', "Thinking: {}\nAccuracy: {}",
                                     "<answer>", "</answer>", "{{", "\\boxed{{"]),
                    st.lists(NUMBER, min_size=3, max_size=3)).map(lambda t: t[0].format(*t[1]))
MANY = st.lists(st.one_of(WRAPPED, ANY_TEXT), max_size=60).map(" \n".join)
HUGE = st.tuples(st.one_of(WRAPPED, st.text(ANY_CHAR, min_size=1, max_size=8)),
                 st.integers(min_value=1_000, max_value=60_000)).map(lambda t: (t[0] or " ") * (t[1] // len(t[0] or " ") + 1))
REPLY = st.one_of(ANY_TEXT, WRAPPED, MANY, HUGE)
WEIGHTS = st.tuples(*[st.floats(0.0, 10.0)] * 3).map(lambda w: w if sum(w) > 0 else (0.0, 0.0, 1.0))


def _in_range(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0)


@fuzz_settings(examples=400)
@given(REPLY)
def test_parse_score_is_in_range_or_none(reply: str) -> None:
    with limits("judge.parse_score"):
        value = parse_score(reply)
    assert _in_range(value)
    event("score" if value is not None else "none")


@fuzz_settings(examples=250)
@given(REPLY, WEIGHTS, st.sampled_from(TEMPLATES))
def test_parse_reply_is_in_range_or_none(reply: str, weights: tuple[float, float, float], template: str) -> None:
    with limits("judge.parse_reply"):
        assert _in_range(parse_reply(template, reply, weights))


@fuzz_settings(examples=150)
@given(st.sampled_from(TEMPLATES), ANY_TEXT, st.one_of(ANY_TEXT, HUGE), ANY_TEXT)
def test_render_substitutes_each_value_once_verbatim(template: str, question: str, response: str,
                                                     answer: str) -> None:
    with limits("judge.render"):
        text = render(template, question=question, response=response, answer=answer)
    values = {"question": question, "response": response, "answer": answer}
    pieces = _FIELD.split(_TEMPLATE_TEXT[template])  # literal, name, literal, name, ..., literal
    expected = "".join(values[p] if i % 2 else p for i, p in enumerate(pieces))
    assert text == expected


# ------------------------------------------------------------------------------------- the whole client
class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0 and math.isfinite(seconds), seconds
        self.now += seconds


def _chat(content: Any) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


BODY = st.one_of(
    REPLY.map(_chat),
    st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=3), st.booleans()).map(_chat),
    st.binary(max_size=300),
    ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b"x" * (4 * 1024 * 1024 + 1)),
)
# (status, body, Retry-After, seconds the reply takes: 30 is past the time-out)
HOSTILE = st.tuples(st.sampled_from([200, 200, 200, 201, 204, 400, 401, 404, 408, 413, 429, 500, 502, 503, 599]),
                    BODY, st.one_of(st.none(), NUMBER, ANY_TEXT), st.sampled_from([0.0, 0.0, 3.0, 30.0]))
GOOD = st.tuples(st.just(200), WRAPPED.map(_chat), st.none(), st.just(0.0))
RESPONSE = st.one_of(GOOD, HOSTILE)


@fuzz_settings(examples=100)
@given(st.lists(RESPONSE, min_size=1, max_size=6), st.lists(ANY_TEXT, min_size=1, max_size=3),
       st.sampled_from(TEMPLATES))
def test_client_survives_any_reply(script: list[tuple[int, bytes, str | None, float]], texts: list[str],
                                   template: str) -> None:
    t = _FakeTime()
    calls = iter(range(10**6))

    def handler(request: httpx.Request) -> httpx.Response:
        status, body, retry_after, seconds = script[next(calls) % len(script)]
        t.now += seconds
        if seconds >= 30.0:
            raise httpx.ReadTimeout("slow judge", request=request)
        headers = {} if retry_after is None else {"Retry-After": retry_after.encode("utf-8", "surrogatepass")}
        return httpx.Response(status, content=body, headers=headers)

    cfg = JudgeConfig(base_url="http://judge.invalid/v1", model="judge", timeout=30.0, max_retries=2, backoff=1.0,
                      max_concurrency=1, step_timeout=60.0)
    samples = [Sample(id=f"s{i}", images=[], messages=[{"role": "user", "content": text}], answer=text,
                      problem_type="free_form") for i, text in enumerate(texts)]
    with limits("judge.client"):
        with JudgeClient(cfg, clock=t.clock, sleep=t.sleep, transport=httpx.MockTransport(handler)) as client:
            values = client.score(texts, samples, template)
        stats = client.stats.as_dict()
    assert len(values) == len(texts) and all(_in_range(v) for v in values)
    event(f"{sum(v is not None for v in values)} of {len(values)} scored")
    for kind in FAILURE_KINDS:
        if stats[kind]:
            event(f"failure: {kind}")
    assert stats["failures"] == sum(stats[k] for k in FAILURE_KINDS) and stats["errors"] == 0
    assert stats["failures"] + stats["unparsable"] == sum(v is None for v in values)
    assert stats["calls"] <= len(texts) * (cfg.max_retries + 1)
    assert t.now <= cfg.step_timeout + cfg.timeout  # the deadline, overrun at most by one reply's fake delay
