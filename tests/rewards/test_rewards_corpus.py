"""The answer-grading regression corpus (tests/rewards/corpus/README.md): vlrl's `accuracy` against the
verdicts of math-verify's own test suite, and against vlrl's cases for every failure class of issue 12."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from vlrl.rewards.accuracy import score_answer

CORPUS = Path(__file__).parent / "corpus"


def _lines(name: str) -> list[dict[str, Any]]:
    with (CORPUS / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


MV_CASES = _lines("mathverify_cases.jsonl")
VLRL_CASES = _lines("vlrl_cases.jsonl")


def _configs(match_types: list[str]) -> list[Any]:
    return [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
            for t in match_types]  # fmt: skip


def _math_verify_alone(case: dict[str, Any]) -> tuple[int, bool]:
    """math-verify's verdict with the test's own configuration, and whether it read both sides."""
    configs = _configs(case["match_types"])
    gold, pred = parse(case["gold"], configs), parse(case["pred"], configs)
    ok = verify(gold, pred, float_rounding=case["precision"], strict=case["strict"],
                allow_set_relation_comp=case["allow_set_relation_comp"])  # fmt: skip
    return int(ok), bool(gold) and bool(pred)


def _vlrl_on_mv_case(case: dict[str, Any]) -> int:
    value = score_answer(case["pred"], case["gold"], "math", math_targets=case["match_types"],
                         float_rounding=case["precision"], math_strict=case["strict"],
                         math_set_relation=case["allow_set_relation_comp"])  # fmt: skip
    return int(value is not None and value >= 0.5)


def test_corpus_files_hold_what_the_readme_says() -> None:
    assert len(MV_CASES) == 273 and len(VLRL_CASES) == 245
    assert Counter(c["source"].split("::")[0] for c in MV_CASES) == {
        "Math-Verify tests/test_all.py": 210,
        "Math-Verify tests/test_yujianll.py": 14,
        "Math-Verify tests/test_mixed_number_extraction.py": 49,
    }
    classes = Counter(c["class"] for c in VLRL_CASES)
    assert set(classes) == {"units on the gold side", "option letters", "number formats", "long answer",
                            "yes/no forms"}  # fmt: skip
    for cls in classes:  # every class has right and wrong answers
        assert {c["expected"] for c in VLRL_CASES if c["class"] == cls} == {0, 1}, cls


def test_math_verify_cases_vlrl_agrees_at_least_as_often_and_equals_it_where_it_reads_both_sides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    agree_mv = agree_vlrl = 0
    differ: list[tuple[int, str, str, int, int]] = []
    for i, case in enumerate(MV_CASES):
        mv, read_both = _math_verify_alone(case)
        ours = _vlrl_on_mv_case(case)
        agree_mv += mv == case["expected"]
        agree_vlrl += ours == case["expected"]
        if read_both and ours != mv:
            differ.append((i, case["gold"][:60], case["pred"][:60], mv, ours))
    with capsys.disabled():
        print(
            f"\nmath-verify's own cases: vlrl {agree_vlrl}/{len(MV_CASES)}, math-verify {agree_mv}/{len(MV_CASES)}"
        )
    assert agree_vlrl >= agree_mv >= 244
    assert differ == []


@pytest.mark.parametrize(
    "case", VLRL_CASES, ids=[f"{i + 1}-{c['class'].replace(' ', '_')}" for i, c in enumerate(VLRL_CASES)]
)
def test_failure_class_case(case: dict[str, Any]) -> None:
    value = score_answer(case["completion"], case["answer"], case["problem_type"], metadata=case)
    assert value is not None and float(value >= 0.5) == case["expected"], (value, case["completion"][-120:])


def test_agreement_by_problem_type_on_the_whole_corpus() -> None:
    """Multiple choice >= 0.99 (the issue's bar); math and numerical at least math-verify's own."""
    by_type: dict[str, list[bool]] = {}
    for case in VLRL_CASES:
        value = score_answer(case["completion"], case["answer"], case["problem_type"], metadata=case)
        by_type.setdefault(case["problem_type"], []).append(
            value is not None and float(value >= 0.5) == case["expected"]
        )
    rate = {pt: sum(v) / len(v) for pt, v in by_type.items()}
    assert rate["multiple_choice"] >= 0.99
    plain = [int(verify(parse(c["answer"]), parse(c["completion"]))) == c["expected"]
             for c in VLRL_CASES if c["problem_type"] in ("math", "numerical")]  # fmt: skip
    ours = by_type["math"] + by_type["numerical"]
    assert sum(ours) >= sum(plain)
