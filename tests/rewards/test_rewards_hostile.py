"""Hostile model output: every check returns a value or None within a generous time bound, never evaluates."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from vlrl.data.sample import PROBLEM_TYPES, Sample
from vlrl.rewards.accuracy import score_answer
from vlrl.rewards.boxes import parse_boxes
from vlrl.rewards.extract import extract_answer
from vlrl.rewards.mathcheck import math_equal
from vlrl.rewards.registry import RewardSpec, combine, list_rewards

BOUND = 10.0  # seconds per case: a safety check, not a benchmark

HOSTILE = {
    "import": "__import__('os').system('touch /tmp/vlrl_pwned')",
    "tower": "10**10**10",
    "latex_tower": "\\boxed{10^{10^{10}}}",
    "braces": "{" * 10_000,
    "nested_boxed": "\\boxed{" * 10_000,
    "one_mb": "<think>" + "step " * 200_000 + "</think><answer>3</answer>",
    "one_mb_tags": "</think><answer>" * 65_000,
    "open_thinks": "<think>" * 150_000,  # no closing tag: a lazy regex rescans the rest of the text per tag
    "one_mb_line": "x" * 1_000_000,
    "huge_exponent": "1e999999",
    "many_nines": "9" * 10_000,
    "spaces": "(1,2)" + " " * 100_000 + "x",
    "json_bomb": "```json\n" + "[" * 50_000 + "\n```",
    "boxes_spam": "[1,2,3,4] " * 50_000,
}
GOLD = {"grounding": "[1, 2, 3, 4]", "multiple_choice": "A"}
META = {"options": ["x", "y"], "image_size": [100, 100]}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_score_answer_bounded(name: str, problem_type: str) -> None:
    start = time.perf_counter()
    value = score_answer(
        HOSTILE[name], GOLD.get(problem_type, "1"), problem_type, metadata=META, math_timeout=2.0
    )
    assert value is None or 0.0 <= value <= 1.0
    assert time.perf_counter() - start < BOUND


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_all_registered_rewards_bounded(name: str) -> None:
    samples = [Sample(id=pt, images=[], messages=[], answer=GOLD.get(pt, "1"), problem_type=pt, metadata=META)
               for pt in PROBLEM_TYPES]  # fmt: skip
    completions = [HOSTILE[name]] * len(samples)
    options = {"accuracy": {"math_timeout": 2.0}, "cosine": {"accuracy_kwargs": {"math_timeout": 2.0}}}
    specs = [RewardSpec(n, 1.0, options.get(n, {})) for n in list_rewards() if not n.startswith("test_")]
    start = time.perf_counter()
    total, per_reward, _ = combine(specs, completions, samples)
    assert time.perf_counter() - start < 3 * BOUND  # all rewards x all problem types
    assert len(total) == len(samples) and all(len(v) == len(samples) for v in per_reward.values())
    start = time.perf_counter()
    extract_answer(HOSTILE[name])
    parse_boxes(HOSTILE[name])
    assert time.perf_counter() - start < BOUND


def test_unclosed_think_tags_cost_linear_time() -> None:
    """Found by tests/fuzz/test_fuzz_rewards.py: dropping ``<think>`` blocks with ``<think>.*?</think>`` rescanned
    the rest of the text from every unclosed tag, so 1 MB of ``<think>`` (a math completion) took hours."""
    from vlrl.rewards.extract import without_thinking

    text = "<think>" * 150_000
    start = time.perf_counter()
    assert without_thinking(text) == text
    assert without_thinking("a<think>x</think>b<THINK>y</Think>c<think>z") == "a\nb\nc<think>z"
    assert score_answer(text + "\n42", "42", "math", math_timeout=2.0) == 1.0
    assert time.perf_counter() - start < BOUND


def test_nothing_was_evaluated() -> None:
    import os

    score_answer(HOSTILE["import"], "1", "math")
    score_answer(HOSTILE["import"], "1", "numerical")
    assert not os.path.exists("/tmp/vlrl_pwned")


def test_math_power_tower_times_out_to_none() -> None:
    start = time.perf_counter()
    assert score_answer("\\boxed{10^{10^{10}}}", "1", "math", math_timeout=1.0) is None
    assert time.perf_counter() - start < 1.0 + 5.0
    # the deadline restored the signal state: a later comparison still works
    assert score_answer("\\boxed{2}", "2", "math") == 1.0


def test_math_outside_main_thread_runs_without_signals() -> None:
    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(math_equal("\\frac{1}{2}", "0.5", timeout=1.0)))
    thread.start()
    thread.join(30)
    assert results == ["equal"]


def test_math_deadline_gives_back_a_callers_timer() -> None:
    import signal

    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        assert score_answer("\\boxed{\\frac{1}{2}}", "0.5", "math", math_timeout=2.0) == 1.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_math_deadline_is_not_raised_inside_a_gc_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found while fuzzing (tests/fuzz/test_fuzz_rewards.py): the deadline's timer fired inside a gc callback
    (hypothesis registers one), where Python swallows the exception and reports it as unraisable; the comparison
    went on until the timer fired again, and under pytest the report itself was interrupted (an error). The
    time-out must be raised in the comparison's own code, after the callback returns."""
    import gc

    from vlrl.rewards.mathcheck import MathTimeout, deadline

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def slow_callback(phase: str, info: dict[str, int]) -> None:  # outlasts the deadline below
        if phase == "start":
            until = time.monotonic() + 0.3
            while time.monotonic() < until:
                pass

    gc.callbacks.append(slow_callback)
    try:
        with pytest.raises(MathTimeout), deadline(0.05):
            gc.collect()
            gc.callbacks.remove(slow_callback)
            until = time.monotonic() + BOUND
            while time.monotonic() < until:
                pass
    finally:
        if slow_callback in gc.callbacks:
            gc.callbacks.remove(slow_callback)
    assert unraisable == []
