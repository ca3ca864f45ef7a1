"""Bit-parallel edit distance / LCS against textbook dynamic programming; number parsing bounds."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from vlrl.rewards.numbers import ParsedNumber, numbers_match, parse_number
from vlrl.rewards.textmatch import anls, lcs_length, levenshtein, normalize_free_form, rouge_l_f1


def _dp_levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[:], i
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
    return row[-1]


def _dp_lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            same = a[i - 1] == b[j - 1]
            table[i][j] = table[i - 1][j - 1] + 1 if same else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_levenshtein_and_lcs_match_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 80)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 80)))
        assert levenshtein(a, b) == _dp_levenshtein(a, b)
        assert lcs_length(list(a), list(b)) == _dp_lcs(list(a), list(b))


def test_hand_values() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert anls("", "") == 1.0
    assert anls("abcd", "abce") == pytest.approx(0.75)
    assert anls("abcd", "abxy") == 0.0  # NL = 0.5 is at the cut-off
    assert anls("abcd", "abxy", threshold=0.6) == pytest.approx(0.5)
    assert normalize_free_form("The  Quick, brown fox!") == "quick brown fox"
    # P = 2/3, R = 2/4 -> F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert rouge_l_f1("x cat dog", "cat y dog z") == pytest.approx(4 / 7)
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("a", "cat") == 0.0


def test_parse_number_forms_and_bounds() -> None:
    assert parse_number("1,234.5") == ParsedNumber(Decimal("1234.5"))
    assert parse_number("50\\%") == ParsedNumber(Decimal("50"), percent=True)
    assert parse_number("5 cm²") == ParsedNumber(Decimal("5"))
    assert parse_number("1/0") is None
    assert parse_number("5 or 6") is None
    assert parse_number("5 or 6", strict=False) == ParsedNumber(Decimal("5"))
    assert parse_number("1e401") is None and parse_number("1e400") is not None
    assert parse_number("9" * 101) is None and parse_number("9" * 100) is not None
    assert parse_number("x" * 20_000) is None  # over MAX_TEXT
    assert numbers_match(ParsedNumber(Decimal("50"), True), ParsedNumber(Decimal("0.5")))
    assert numbers_match(ParsedNumber(Decimal("50"), True), ParsedNumber(Decimal("50")))
    assert not numbers_match(ParsedNumber(Decimal("50"), True), ParsedNumber(Decimal("5")))
