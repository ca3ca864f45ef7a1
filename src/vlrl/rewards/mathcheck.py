"""Math answers compared through math-verify (`parse`, `verify`), under one wall-clock deadline.

math-verify's own time-outs use ``signal.alarm`` with whole seconds and raise ValueError outside the
main thread. Here its time-outs are switched off (``parsing_timeout=None``, ``timeout_seconds=None``)
and the whole comparison (both parses and the verify) runs under `deadline`:

- in the main thread of the process (the usual case, and the case inside a `RewardRunner` worker
  process), an ``ITIMER_REAL`` timer raises `MathTimeout` (a BaseException, so library code's
  ``except Exception`` cannot swallow it) when the budget is spent, and keeps re-firing every 50 ms
  until the comparison has unwound; a firing that lands in a gc callback or a ``__del__`` (where Python
  would swallow the exception) raises nothing and leaves it to the next;
- in any other thread no timer can be set: the comparison runs without an in-process bound and the
  caller must rely on the runner's process pool (which kills a worker past its time limit).

Which of math-verify's extraction configs reads a text (`parse_config`): a text that holds ``$``, ``\\(``,
``\\[`` or ``\\boxed`` is math-verify's usual input (a completion, a delimited gold) and is parsed as it is, with
``\\boxed`` first. A short bare answer (one line, at most `MAX_BARE_CHARS`) that reads as one number with
units or words around it (``1 000``, ``1000,99``, ``130°``, ``12 cm``; `vlrl.rewards.numbers.parse_number`)
goes to the expression extraction as it is, which knows thousands separators, decimal commas and units;
any other short bare answer is LaTeX and is parsed inside ``$...$`` (as it is, the expression extraction
reads ``2\\sqrt{3}`` as 2, ``y=2x+1`` as 2 and ``[1, 2)`` as 2). A longer text goes as it is.
Two number forms that math-verify misreads are rewritten first: scientific notation (``1.5e3``, read as
1.5) as a plain decimal, and thousands grouped by spaces or dots with a decimal comma (``1 000,99``, read as
1000) as ``1000.99``. Answers holding a number with more than 100 digits or a decimal exponent beyond 400 are
refused before math-verify sees them.

`targets` names the extraction configs, as math-verify's own tests do: ``latex`` (LaTeX, ``\\boxed`` first)
and ``expr`` (plain expressions and numbers); both by default.
"""

from __future__ import annotations

import gc
import logging
import re
import signal
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from vlrl.rewards.numbers import MAX_DIGITS, MAX_EXPONENT, parse_number

MathResult = Literal["equal", "different", "unparsed", "timeout"]

_ABSURD = re.compile(rf"\d{{{MAX_DIGITS + 1},}}|\d\s*[eE]\s*[-+]?\d{{{len(str(MAX_EXPONENT)) + 1},}}")
_SCI = re.compile(r"\d\s*[eE]\s*[-+]?\d|\\times\s*10\s*\^")
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
# one number with thousands groups (space, comma, dot, apostrophe) or a decimal comma, then units or words
# thousands grouped by spaces or dots and a decimal comma (1 000,99; 1.000,99), which math-verify reads as 1000 / 1
_EUROPEAN = re.compile(r"([-+−]?\s*\d{1,3}(?:[ .]\d{3})+),(\d+)(\D*)")
_PLAIN_NUMBER = re.compile(r"[-+−]?\s*[€£¥]?\s*\d+(?:[ ,.']\d{3})*(?:[.,]\d+)?\s*[%°]?[^\d{}^_=]*")


class MathTimeout(BaseException):
    """Raised by the `deadline` timer; BaseException so that library `except Exception` lets it through."""


class _DropNoTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_LOADED = False


def _math_verify() -> Any:
    """Import math-verify lazily (it pulls in sympy) and silence its 'timeout disabled' notice, which is
    wrong here: `deadline` provides the time-out."""
    global _LOADED
    import math_verify

    if not _LOADED:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropNoTimeoutWarning())
        _LOADED = True
    return math_verify


def warm_up() -> None:
    """Import math-verify and parse once, so the first real call does not pay the import time."""
    mv = _math_verify()
    mv.verify(
        mv.parse("$1$", parsing_timeout=None), mv.parse("$1$", parsing_timeout=None), timeout_seconds=None
    )


def _in_finalizer(frame: types.FrameType | None) -> bool:
    """True if `frame` runs inside a gc callback or a ``__del__``, where Python swallows an exception (reporting it
    as unraisable): the time-out waits for the timer's next firing, in the comparison's own code."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextmanager
def deadline(seconds: float | None) -> Iterator[bool]:
    """Raise `MathTimeout` in the body after `seconds` (main thread only); yields whether a timer is armed."""
    if (
        seconds is None
        or seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield False
        return
    armed = [True]

    def _handler(signum: int, frame: types.FrameType | None) -> None:
        if armed[0] and not _in_finalizer(frame):
            raise MathTimeout()

    old_handler = signal.signal(signal.SIGALRM, _handler)
    started = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield True
    finally:
        while True:
            try:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except MathTimeout:
                continue
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give a caller's own pending timer back, minus the time spent here
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


MAX_BARE_CHARS = 300
TARGETS = ("latex", "expr")


def _configs(mv: Any, targets: tuple[str, ...]) -> list[Any]:
    made = {
        "latex": lambda: mv.LatexExtractionConfig(boxed_match_priority=0),
        "expr": lambda: mv.ExprExtractionConfig(),
    }
    unknown = [t for t in targets if t not in made]
    if unknown or not targets:
        raise ValueError(f"unknown math targets {unknown or targets!r}; valid: {', '.join(TARGETS)}")
    return [made[t]() for t in targets]


def parse_config(text: str) -> tuple[str, str]:
    """(how, text to parse): ``as_is`` or ``latex`` (wrapped in ``$...$``); see the module doc."""
    text = text.strip()
    if _SCI.search(text):
        number = parse_number(text)
        if number is not None:
            return "as_is", format(number.value, "f") + ("\\%" if number.percent else "")
    if _DELIMITED.search(text) or "\n" in text or len(text) > MAX_BARE_CHARS:
        return "as_is", text
    if "\\" not in text and (parse_number(text) is not None or _PLAIN_NUMBER.fullmatch(text)):
        european = _EUROPEAN.fullmatch(text)
        if european:
            whole, decimals, rest = european.groups()
            return "as_is", re.sub(r"[ .]", "", whole) + "." + decimals + rest
        return "as_is", text
    if text.count("{") != text.count("}"):
        return "as_is", text
    return "latex", "$" + text + "$"


def _parse(mv: Any, text: str, configs: list[Any], latex: bool = True) -> list[Any]:
    how, prepared = parse_config(text)
    if how == "latex" and not latex:  # only the expression extraction was asked for: nothing to wrap
        how, prepared = "as_is", text.strip()
    parsed = mv.parse(prepared, configs, parsing_timeout=None)
    if not parsed and how == "latex":
        parsed = mv.parse(text, configs, parsing_timeout=None)
    return list(parsed)


def is_number(text: str, *, timeout: float | None = 5.0) -> bool:
    """True if `text` is one number: for `vlrl.rewards.numbers` (with thousands groups or a decimal comma),
    or for math-verify an expression without free symbols (``\\frac{\\sqrt{2}}{2}``, ``2\\pi``)."""
    if parse_number(text) is not None or _PLAIN_NUMBER.fullmatch(text.strip()):
        return True
    mv = _math_verify()
    try:
        with deadline(timeout):
            parsed = _parse(mv, text, _configs(mv, TARGETS))
            return bool(parsed) and not getattr(parsed[0], "free_symbols", {"?"})
    except MathTimeout:
        return False
    except Exception:
        return False


def has_absurd_number(text: str) -> bool:
    """True if `text` holds a number with > 100 digits or an exponent beyond 400 (refused, never computed)."""
    return _ABSURD.search(text) is not None


def math_equal(
    prediction: str,
    gold: str,
    *,
    timeout: float | None = 5.0,
    targets: tuple[str, ...] = TARGETS,
    float_rounding: int = 6,
    strict: bool = True,
    set_relation: bool = False,
) -> MathResult:
    """Compare two answer texts with math-verify (gold first, as `verify` expects) within `timeout` s.

    ``unparsed`` when math-verify reads nothing from one side; `float_rounding`, `strict` and `set_relation`
    (``allow_set_relation_comp``: ``x > 1`` equals ``(1, \\infty)``) are `verify`'s.
    """
    mv = _math_verify()
    configs = _configs(mv, tuple(targets))
    try:
        with deadline(timeout):
            gold_parsed = _parse(mv, gold, configs, "latex" in targets)
            pred_parsed = _parse(mv, prediction, configs, "latex" in targets)
            if not gold_parsed or not pred_parsed:
                return "unparsed"
            ok = mv.verify(
                gold_parsed, pred_parsed, float_rounding=float_rounding, strict=strict,
                allow_set_relation_comp=set_relation, timeout_seconds=None,
            )  # fmt: skip
            return "equal" if ok else "different"
    except MathTimeout:
        return "timeout"
    except Exception:  # math-verify or sympy failed on this input
        return "unparsed"
