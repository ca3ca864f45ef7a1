"""Bounded parsing and comparison of numbers written by a model.

`parse_number(text)` reads ONE number from a short answer and refuses anything else:

- forms: ``42``, ``-3.5``, ``.5``, ``1,234`` (commas only as 3-digit thousands groups), ``3/4``,
  ``\\frac{3}{4}`` / ``\\dfrac``, ``1.5e3``, ``1.5 \\times 10^{3}``, ``50%`` / ``50\\%``, ``\\boxed{...}``,
  ``$...$``, ``x = 5`` (the part after the last ``=`` is read), a currency sign (``$5``, ``-$5``, ``€5``)
  and units (``12 cm``, ``3 m^2``, ``5 cm²``) are ignored.
- strict by default: after the number only non-digit text (units, words, punctuation) may remain,
  so a hedge such as "5 or 6" is refused rather than read as 5. ``strict=False`` takes the first number.
- bounded: the text is capped at `MAX_TEXT` characters, a number with more than `MAX_DIGITS` digits or
  a decimal exponent beyond +-`MAX_EXPONENT` is refused (None) instead of computed. Values are
  `decimal.Decimal`, so nothing is ever expanded to a huge integer.

`numbers_match(pred, gold, rel_tol, abs_tol)` compares two parsed numbers. Percent rule: a number
written with ``%`` may be read either as itself or divided by 100, so ``50%`` matches both ``50`` and
``0.5`` (in either direction: gold ``50%`` accepts ``50`` and ``0.5``). Everything else compares
``|p - g| <= max(rel_tol * max(|p|, |g|), abs_tol)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext

from vlrl.rewards.extract import last_boxed

MAX_TEXT = 10_000
MAX_DIGITS = 100
MAX_EXPONENT = 400
_PREC = 2 * MAX_DIGITS + 20

_SPACES = re.compile(r"\s+")
_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|textit|mbox|operatorname|mathbf)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*\{?\s*([-+]?\d{1,6})\s*\}?")
_UNIT_POWER = re.compile(r"(?<=[A-Za-z])\s*\^\s*\{?\s*\d{1,3}\s*\}?|[²³]")
_DROP = re.compile(r"\\left|\\right|\\[,!;: ]|\\quad|\\qquad|[$€£¥]|\\\(|\\\)|\\\[|\\\]")
_EQUALS = re.compile(r"=|≈|\\approx|\\eq\b")
_NUMBER = re.compile(
    r"(?<![\d.A-Za-z])(?:(?P<sign>[-+])\s*)?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"
    r"(?:\s*[eE]\s*(?P<exp>[-+]?\d+))?"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<pct>\s*%)?"
)


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from text; `percent` is True when it was written with a % sign."""

    value: Decimal
    percent: bool = False


def clean_number_text(text: str) -> str:
    """Strip LaTeX/markdown decoration around a number (see module doc); bounded regex work only."""
    if "\\boxed" in text or "\\fbox" in text:
        text = last_boxed(text) or text
    text = (
        _SPACES.sub(" ", text).replace("−", "-").replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    )
    text = _WRAPPERS.sub(r" \1 ", text)
    text = _FRAC.sub(r"\1/\2", text)
    text = _FRAC_SHORT.sub(r"\1/\2", text)
    text = _TIMES_TEN.sub(r"e\1", text)
    text = _DROP.sub("", text)
    parts = _EQUALS.split(text)
    text = parts[-1] if parts else text
    text = _UNIT_POWER.sub("", text)
    return text.strip().strip("*").strip()


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _to_decimal(m: re.Match[str]) -> Decimal | None:
    num, exp, den = m.group("num").replace(",", ""), m.group("exp"), m.group("den")
    if _digits(num) > MAX_DIGITS or (den is not None and _digits(den) > MAX_DIGITS):
        return None
    if exp is not None and (len(exp.lstrip("+-")) > 6 or abs(int(exp)) > MAX_EXPONENT):
        return None
    try:
        with localcontext() as ctx:
            ctx.prec = _PREC
            value = Decimal(num)
            if exp is not None:
                value = value.scaleb(int(exp))
            if den is not None:
                denominator = Decimal(den)
                if denominator == 0:
                    return None
                value = value / denominator
            if m.group("sign") == "-":
                value = -value
            if abs(value.adjusted()) > MAX_EXPONENT + MAX_DIGITS:
                return None
            return value
    except (InvalidOperation, ValueError, ArithmeticError):
        return None


def parse_number(text: str, *, strict: bool = True) -> ParsedNumber | None:
    """The one number in `text`, or None (no number, several numbers when strict, or out of bounds)."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return None
    cleaned = clean_number_text(text)
    m = _NUMBER.search(cleaned)
    if m is None:
        return None
    if strict and any(ch.isdigit() for ch in cleaned[m.end() :]):
        return None
    if strict and any(ch.isdigit() for ch in cleaned[: m.start()]):
        return None
    value = _to_decimal(m)
    if value is None:
        return None
    return ParsedNumber(value=value, percent=m.group("pct") is not None)


def _close(a: Decimal, b: Decimal, rel_tol: float, abs_tol: float) -> bool:
    with localcontext() as ctx:
        ctx.prec = _PREC
        diff = abs(a - b)
        bound = max(Decimal(repr(rel_tol)) * max(abs(a), abs(b)), Decimal(repr(abs_tol)))
        return diff <= bound


def numbers_match(
    pred: ParsedNumber, gold: ParsedNumber, rel_tol: float = 1e-4, abs_tol: float = 1e-9
) -> bool:
    """True when `pred` equals `gold` within tolerance, under the percent rule of the module doc."""
    hundred = Decimal(100)
    preds = [pred.value, pred.value / hundred] if pred.percent else [pred.value]
    golds = [gold.value, gold.value / hundred] if gold.percent else [gold.value]
    return any(_close(p, g, rel_tol, abs_tol) for p in preds for g in golds)
