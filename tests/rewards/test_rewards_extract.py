"""Answer extraction: each mode, the order, bounds."""

from __future__ import annotations

import time

import pytest

from vlrl.rewards.extract import extract_answer, last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think><answer>42</answer>", "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", "2"),
        ("<think>long</think><answer>  7 ", "7"),  # missing closing tag at the end
        ("<ANSWER>B</ANSWER>", "B"),
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{ {2} }", "{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("blah. The answer is 12.", "12"),
        ("The final answer is: **C**.", "C"),
        ("Reasoning...\nAnswer: yes\n", "yes"),
        ("line one\n\nlast line here\n\n", "last line here"),
    ],
)
def test_default_modes(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_answer_tag_wins_over_boxed_and_order_is_configurable() -> None:
    text = "\\boxed{1}\n<answer>2</answer>"
    assert extract_answer(text) == "2"
    assert extract_answer(text, modes=("boxed", "answer_tag")) == "1"
    assert extract_answer(text, modes=("answer_is",)) is None


def test_empty_answer_falls_through_and_nothing_gives_none() -> None:
    assert extract_answer("<answer></answer>", modes=("answer_tag", "boxed")) is None
    assert extract_answer("   \n \n") is None
    assert extract_answer("") is None


def test_unknown_mode_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="answer_tag, boxed, answer_is, last_line"):
        extract_answer("x", modes=("nope",))


def test_unbalanced_and_deep_boxed_are_bounded() -> None:
    assert last_boxed("\\boxed{1") is None
    deep = "\\boxed{" + "{" * 100 + "1" + "}" * 101
    assert last_boxed(deep) is None  # nesting deeper than MAX_BRACE_DEPTH is refused
    nested = "\\boxed{" * 10_000
    start = time.perf_counter()
    assert last_boxed(nested) is None
    assert extract_answer(nested) == nested  # falls through to the last line
    assert time.perf_counter() - start < 5
