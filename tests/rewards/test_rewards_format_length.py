"""Format, tag count, DAPO overlong, cosine length scaling and repetition penalty: hand values."""

from __future__ import annotations

import math
import re

import pytest

from vlrl.data.sample import Sample
from vlrl.rewards.format import STRICT_PATTERN, lenient_format, single_answer, strict_format, tag_count
from vlrl.rewards.length import cosine_scaled, overlong_penalty, repetition_penalty
from vlrl.rewards.registry import get_reward

FORMAT_CASES = [
    "<think>a</think><answer>b</answer>",
    "<think>a</think>\n\n <answer>b</answer>",
    "<think></think><answer></answer>",
    "<think>a</think><answer>b</answer>\n",
    " <think>a</think><answer>b</answer>",
    "<think>a</think>x<answer>b</answer>",
    "<think>a<answer>b</answer>",
    "<think>a</think><answer>b</answer><answer>c</answer>",
    "<think>x</think> <answer>1</answer></think><answer>2</answer>",
    "<answer>b</answer><think>a</think>",
    "<think>a</think><answer>b",
    "",
]


@pytest.mark.parametrize("text", FORMAT_CASES)
def test_strict_format_equals_the_regex(text: str) -> None:
    assert strict_format(text) == bool(re.fullmatch(STRICT_PATTERN, text, re.DOTALL))


def test_format_variants_hand_values() -> None:
    assert strict_format("<think>a</think>\n<answer>b</answer>")
    assert not strict_format("<think>a</think>\n<answer>b</answer>\n")
    assert lenient_format("Sure! <think>a</think> so <answer>b</answer> bye")
    assert not lenient_format("<answer>b</answer><think>a</think>")
    assert single_answer("blah <answer> 3 </answer>")
    assert not single_answer("<answer>1</answer><answer>2</answer>")
    assert not single_answer("<answer>  </answer>")
    assert not single_answer("</answer>3<answer>")
    assert tag_count("<think>a</think><answer>b</answer>") == 1.0
    assert tag_count("<think><think></think>") == 0.25
    assert tag_count("<think>\na\n</think>\n<answer>\nb\n</answer>", newlines=True) == 1.0
    assert tag_count("<think>a</think><answer>b</answer>", newlines=True) == 0.0


def test_format_rewards_registered() -> None:
    texts = [
        "<think>a</think><answer>b</answer>",
        "x <think>a</think> <answer>b</answer> y",
        "<answer>b</answer>",
    ]
    samples = [
        Sample(id=str(i), images=[], messages=[], answer="b", problem_type="free_form") for i in range(3)
    ]
    assert get_reward("format")(texts, samples) == [1.0, 0.0, 0.0]
    assert get_reward("format_lenient")(texts, samples) == [1.0, 1.0, 0.0]
    assert get_reward("answer_format")(texts, samples) == [1.0, 1.0, 1.0]
    assert get_reward("tag_count")(texts, samples) == [1.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (100, -1.0), (101, -1.0), (10**6, -1.0)],
)
def test_overlong_penalty_hand_values(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_length=100, cache_length=20) == pytest.approx(expected)


def test_overlong_reward_length_sources() -> None:
    sample = Sample(id="1", images=[], messages=[], answer="x", problem_type="free_form")
    reward = get_reward("overlong")
    text = "w " * 90  # 90 whitespace tokens, 180 characters
    assert reward([text], [sample], max_length=100, cache_length=20) == [pytest.approx(-0.5)]
    assert reward([text], [sample], max_length=100, cache_length=20, length_unit="chars") == [-1.0]
    assert reward([text], [sample], max_length=100, cache_length=20, completion_lengths=[85]) == [
        pytest.approx(-0.25)
    ]
    tagged = Sample(
        id="2",
        images=[],
        messages=[],
        answer="x",
        problem_type="free_form",
        metadata={"completion_length": 10},
    )
    assert reward([text], [tagged], max_length=100, cache_length=20) == [0.0]
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(5, max_length=10, cache_length=20)


@pytest.mark.parametrize(
    ("length", "correct", "expected"),
    [(0, True, 1.0), (50, True, 0.75), (100, True, 0.5), (0, False, -1.0), (50, False, -0.75), (100, False, -0.5),
     (101, True, -1.0), (25, True, 0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)],
)  # fmt: skip
def test_cosine_hand_values(length: int, correct: bool, expected: float) -> None:
    assert cosine_scaled(length, correct, 100) == pytest.approx(expected)


def test_cosine_reward_uses_accuracy() -> None:
    samples = [
        Sample(id=str(i), images=[], messages=[], answer="3", problem_type="numerical") for i in range(3)
    ]
    texts = ["<answer>3</answer>", "<answer>4</answer>", "<answer>3</answer>"]
    values = get_reward("cosine")(texts, samples, max_length=100, completion_lengths=[50, 50, 200])
    assert values == [pytest.approx(0.75), pytest.approx(-0.75), -1.0]
    bad = Sample(id="b", images=[], messages=[], answer="x", problem_type="numerical")
    assert get_reward("cosine")(["3"], [bad]) == [None]


def test_repetition_penalty_hand_values() -> None:
    assert repetition_penalty("a b c a b c", ngram_size=3) == pytest.approx(-0.25)  # 4 trigrams, 3 distinct
    assert repetition_penalty("A a a a", ngram_size=2) == pytest.approx(-2 / 3)  # 3 bigrams, 1 distinct
    assert repetition_penalty("a b c d", ngram_size=3, max_penalty=-0.5) == 0.0
    assert repetition_penalty("a b", ngram_size=3) == 0.0 and repetition_penalty("") == 0.0
    with pytest.raises(ValueError, match="max_penalty"):
        repetition_penalty("a", max_penalty=1.0)


@pytest.mark.parametrize("given", [-(10**400), -5, -1.5, "12", None, True])
def test_a_metadata_length_that_is_no_token_count_is_not_used(given: object) -> None:
    """Found while fuzzing (tests/fuzz/test_fuzz_rewards.py): ``completion_length: -1e400`` (an integer in the data)
    made the cosine reward raise OverflowError. A metadata length must be a non-negative int; anything else is
    ignored and the length counted from the text (here 2 words)."""
    sample = Sample(id="1", images=[], messages=[], answer="x y", problem_type="free_form",
                    metadata={"completion_length": given})  # fmt: skip
    expected = cosine_scaled(2, True, 4)
    assert get_reward("cosine")(["x y"], [sample], max_length=4) == [pytest.approx(expected)]
    assert get_reward("overlong")(["x y"], [sample], max_length=4, cache_length=2) == [0.0]
