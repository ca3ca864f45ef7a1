"""score_answer by problem type, with hand-computed values (math cases against math-verify directly)."""

from __future__ import annotations

import pytest
from math_verify import parse, verify

from vlrl.data.sample import Sample
from vlrl.rewards.accuracy import accuracy_reward, score_answer
from vlrl.rewards.choice import parse_choice
from vlrl.rewards.mathcheck import parse_config

OPTIONS = {"options": ["cat", "dog", "bird", "fish"]}


@pytest.mark.parametrize(
    "prediction",
    ["B", "(B)", "B.", "B)", "[B]", "Answer: B", "the answer is B", "The answer is (B).", "b", "option B", "dog",
     "B. dog", "(B) dog", "**B**", "\\boxed{B}", "<think>A or B?</think><answer>B</answer>", "I choose option B.",
     "I think it is B"],
)  # fmt: skip
def test_multiple_choice_forms_right(prediction: str) -> None:
    assert score_answer(prediction, "B", "multiple_choice", metadata=OPTIONS) == 1.0


@pytest.mark.parametrize("prediction", ["A", "(C)", "cat", "E", "Bob thinks so", "", "<answer></answer>"])
def test_multiple_choice_forms_wrong(prediction: str) -> None:
    assert score_answer(prediction, "B", "multiple_choice", metadata=OPTIONS) == 0.0


def test_multiple_choice_gold_forms_and_dict_options() -> None:
    assert score_answer("B", "dog", "multiple_choice", metadata=OPTIONS) == 1.0  # gold as option text
    assert score_answer("B", "(B)", "multiple_choice") == 1.0  # no options: any letter
    assert (
        score_answer("bird", "C", "multiple_choice", metadata={"options": {"a": "cat", "c": "bird"}}) == 1.0
    )
    assert score_answer("B", "<answer> B </answer>", "multiple_choice") == 1.0  # VLM-R1 style gold
    assert score_answer("A", "F", "multiple_choice", metadata=OPTIONS) is None  # gold letter not an option
    assert score_answer("A", "zebra", "multiple_choice", metadata=OPTIONS) is None
    assert score_answer("\\boxed{\\text{B}}", "B", "multiple_choice", extract=False) == 1.0
    assert parse_choice("A. 5 cm", {"A": "A. 5 cm", "B": "B. 6 cm"}) == "A"
    assert parse_choice("6 cm", {"A": "A. 5 cm", "B": "B. 6 cm"}) == "B"


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [("42", "42"), ("-3", "-3"), ("3.50", "3.5"), (".5", "0.5"), ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"),
     ("-\\frac{1}{2}", "-0.5"), ("50%", "50"), ("50%", "0.5"), ("0.5", "50%"), ("50", "50%"), ("1,234", "1234"),
     ("1,234,567.5", "1234567.5"), ("12 cm", "12"), ("$5", "5"), ("-$5", "-5"), ("€5.00", "5"), ("3 m^2", "3"),
     ("1.5e3", "1500"), ("1.5 \\times 10^{3}", "1500"), ("2.5E-3", "0.0025"), ("x = 7", "7"), ("\\boxed{8}", "8"),
     ("The answer is 3.", "3"), ("<answer>12 apples</answer>", "12"), ("3.14160", "3.1416")],
)  # fmt: skip
def test_numerical_right(prediction: str, gold: str) -> None:
    assert score_answer(prediction, gold, "numerical") == 1.0


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("43", "42"),
        ("5 or 6", "5"),
        ("3.15", "3.1416"),
        ("3.14159", "3.1416"),  # math-verify compares at 6 decimals; a tolerance is asked for by rel_tol
        ("12346", "12345"),
        ("-3", "3"),
        ("1,2,3", "1"),
        ("abc", "1"),
        ("0.6", "50%"),
    ],
)
def test_numerical_wrong(prediction: str, gold: str) -> None:
    assert score_answer(prediction, gold, "numerical") == 0.0


def test_numerical_tolerance_and_bad_gold() -> None:
    assert score_answer("100.5", "100", "numerical") == 0.0
    assert score_answer("100.5", "100", "numerical", rel_tol=0.01) == 1.0
    assert score_answer("3.14159", "3.1416", "numerical", rel_tol=1e-4) == 1.0
    assert score_answer("1e-12", "0", "numerical", rel_tol=1e-4) == 1.0  # abs_tol 1e-9
    assert score_answer("3", "three", "numerical") is None
    assert score_answer("1e999999", "1", "numerical") == 0.0  # refused, not computed
    assert score_answer("9" * 10_000, "9", "numerical") == 0.0


MATH_ORACLE_CASES = [
    ("$0.5$", "\\boxed{\\frac{1}{2}}"),
    ("$\\frac{1}{2}$", "$0.5$"),
    ("$x=2$", "\\boxed{x=2}"),
    ("$2$", "\\boxed{x=2}"),
    ("$\\{1,2\\}$", "\\boxed{\\{2,1\\}}"),
    ("$\\{1,2\\}$", "\\boxed{\\{1,3\\}}"),
    ("$(1,2]$", "\\boxed{(1,2]}"),
    ("$(1,2]$", "\\boxed{(1,2)}"),
    ("$[1,2)$", "$1 \\le x < 2$"),
    ("$2\\sqrt{3}$", "\\boxed{\\sqrt{12}}"),
    ("$\\frac{\\pi}{2}$", "\\boxed{\\pi/2}"),
    ("$y = 2x + 1$", "\\boxed{y = 1 + 2x}"),
    ("$(3,-4)$", "\\boxed{(3, -4)}"),
    ("$x^2+1$", "\\boxed{x^2+2}"),
]


@pytest.mark.parametrize(("gold", "prediction"), MATH_ORACLE_CASES)
def test_math_agrees_with_math_verify(gold: str, prediction: str) -> None:
    reference = float(verify(parse(gold), parse(prediction)))
    assert score_answer(prediction, gold, "math", extract=False) == reference
    assert score_answer(prediction, gold, "math") == reference  # extraction then \boxed{} wrapping


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [("\\frac{1}{2}", "0.5", 1.0), ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0), ("\\boxed{x=2}", "2", 1.0),
     ("\\boxed{\\{1,2\\}}", "{2,1}", 1.0), ("\\boxed{[1, 2)}", "[1,2)", 1.0), ("\\boxed{(1,2)}", "[1,2)", 0.0),
     ("\\boxed{1e5}", "100000", 1.0), ("\\boxed{1e5}", "1", 0.0), ("1e999999", "1", 0.0), ("3", "3", 1.0)],
)  # fmt: skip
def test_math_hand_cases(prediction: str, gold: str, expected: float) -> None:
    assert score_answer(prediction, gold, "math") == expected


def test_math_falls_back_when_math_verify_cannot_parse() -> None:
    assert score_answer("<answer>twelve</answer>", "twelve", "math") == 1.0  # loose string match
    assert score_answer("<answer>eleven</answer>", "twelve", "math") == 0.0


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [("yes", "Yes", 1.0), ("No.", "no", 1.0), ("True", "yes", 1.0), ("false", "no", 1.0), ("y", "true", 1.0),
     ("N", "false", 1.0), ("Yes, because of the sign.", "yes", 1.0), ("The answer is no", "no", 1.0),
     ("**Yes**", "yes", 1.0), ("maybe", "yes", 0.0), ("no", "yes", 0.0), ("yes", "perhaps", None)],
)  # fmt: skip
def test_yes_no(prediction: str, gold: str, expected: float | None) -> None:
    assert score_answer(prediction, gold, "yes_no") == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [("Hello  World", "hello world", 1.0), ("kitten", "sitting", 1 - 3 / 7), ("abxde", "abcde", 0.8),
     ("abcd", "abxy", 0.0),  # NL = 0.5 exactly: at the cut-off, scores 0
     ("abcde", "abxye", 0.6), ("ab", "abcde", 0.0)],
)  # fmt: skip
def test_ocr_anls_hand_values(prediction: str, gold: str, expected: float) -> None:
    assert score_answer(prediction, gold, "ocr") == pytest.approx(expected)


def test_ocr_alternative_answers() -> None:
    assert score_answer("colour", "color", "ocr", metadata={"answers": ["colour"]}) == 1.0


def test_free_form_exact_and_rouge_l() -> None:
    assert score_answer("The Cat!", "cat", "free_form") == 1.0
    assert score_answer("a dog", "cat", "free_form") == 0.0
    value = score_answer(
        "the cat sat on the mat", "the cat is on the mat", "free_form", free_form_metric="rouge_l"
    )
    assert value == pytest.approx(0.75)  # tokens: cat sat on mat / cat is on mat; LCS 3; P = R = 3/4
    value = score_answer("a black cat sat", "the cat sat down", "free_form", free_form_metric="rouge_l")
    assert value == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="exact, rouge_l"):
        score_answer("x", "x", "free_form", free_form_metric="bleu")


def test_no_answer_and_oversized_answer_score_zero() -> None:
    assert score_answer("", "3", "numerical") == 0.0
    assert score_answer("<answer>" + "1" * 3000 + "</answer>", "1", "free_form") == 0.0


def test_unknown_problem_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="multiple_choice"):
        score_answer("x", "x", "essay")


def test_accuracy_reward_per_pair() -> None:
    samples = [
        Sample(id="1", images=[], messages=[], answer="3", problem_type="numerical"),
        Sample(id="2", images=[], messages=[], answer="C", problem_type="multiple_choice"),
        Sample(id="3", images=[], messages=[], answer="x", problem_type="numerical"),
    ]
    values = accuracy_reward(
        ["<answer>3</answer>", "<answer>B</answer>", "3"], samples, completion_lengths=[1, 2, 3]
    )
    assert values == [1.0, 0.0, None]


def test_latex_only_configuration_reads_no_plain_number() -> None:
    """math-verify's test_latex_notation: with LaTeX extraction only, an inline `$ ... $` split over lines is no
    answer; its default configuration (LaTeX + expressions) reads the 9, and so does vlrl's default."""
    pred = "Answer $ \n 9 \n $"
    assert score_answer(pred, "$9$", "math", math_targets=["latex"]) == 0.0
    assert score_answer(pred, "$9$", "math") == float(verify(parse("$9$"), parse(pred))) == 1.0
    with pytest.raises(ValueError, match="unknown math targets"):
        score_answer("9", "9", "math", math_targets=["sympy"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1 000", ("as_is", "1 000")), ("1000,99", ("as_is", "1000,99")), ("130°", ("as_is", "130°")),
     ("12 cm", ("as_is", "12 cm")), ("1 000,99", ("as_is", "1000.99")), ("1.000,5 m", ("as_is", "1000.5 m")),
     ("1.5e3", ("as_is", "1500")), ("2\\sqrt{3}", ("latex", "$2\\sqrt{3}$")), ("y=2x+1", ("latex", "$y=2x+1$")),
     ("[1, 2)", ("latex", "$[1, 2)$")), ("1, 2, 3", ("latex", "$1, 2, 3$")), ("$9$", ("as_is", "$9$")),
     ("so \\boxed{3}", ("as_is", "so \\boxed{3}")), ("a\nb", ("as_is", "a\nb"))],
)  # fmt: skip
def test_which_extraction_reads_a_bare_answer(text: str, expected: tuple[str, str]) -> None:
    assert parse_config(text) == expected


def test_an_answer_tag_is_the_answer_even_when_unreadable() -> None:
    """A letter elsewhere in the completion does not rescue a garbled tag (seen in an RL rollout of the demo)."""
    options = {"options": ["A", "B", "C", "D"]}
    assert score_answer("<answer>D</answer> 678<answer>4", "D", "multiple_choice", metadata=options) == 0.0
    assert score_answer("<answer>4</answer>\nD", "D", "multiple_choice", metadata=options) == 0.0
    assert score_answer("Answer: D\n(B) looks wrong", "D", "multiple_choice", metadata=options) == 1.0
    assert score_answer("D. the tallest bar\nThe others are shorter.", "D", "multiple_choice", metadata=options) == 1.0
