"""Math answers compared through math-verify (`parse`, `verify`), under one wall-clock deadline.

math-verify's own time-outs use ``signal.alarm`` with whole seconds and raise ValueError outside the
main thread. Here its time-outs are switched off (``parsing_timeout=None``, ``timeout_seconds=None``)
and the whole comparison (both parses and the verify) runs under `deadline`:

- in the main thread of the process (the usual case, and the case inside a `RewardRunner` worker
  process), an ``ITIMER_REAL`` timer raises `MathTimeout` (a BaseException, so library code's
  ``except Exception`` cannot swallow it) when the budget is spent, and keeps re-firing every 50 ms
  until the comparison has unwound;
- in any other thread no timer can be set: the comparison runs without an in-process bound and the
  caller must rely on the runner's process pool (which kills a worker past its time limit).

Input handling: an answer that has no ``$``, ``\\(``, ``\\[`` or ``\\boxed`` is wrapped as
``\\boxed{...}`` before parsing (math-verify's plain-text extraction drops e.g. the interval in
``[1, 2)`` or the root in ``2\\sqrt{3}``). A plain number in scientific notation (``1.5e3``) is rewritten
as a plain decimal first (math-verify reads ``e`` as Euler's number). Answers holding a number with more
than 100 digits or a decimal exponent beyond 400 are refused before math-verify sees them.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from vlrl.rewards.numbers import MAX_DIGITS, MAX_EXPONENT, parse_number

MathResult = Literal["equal", "different", "unparsed", "timeout"]

_ABSURD = re.compile(rf"\d{{{MAX_DIGITS + 1},}}|\d\s*[eE]\s*[-+]?\d{{{len(str(MAX_EXPONENT)) + 1},}}")
_SCI = re.compile(r"\d\s*[eE]\s*[-+]?\d|\\times\s*10\s*\^")
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")


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

    def _handler(signum: int, frame: object) -> None:
        if armed[0]:
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


def _prepare(text: str) -> str:
    text = text.strip()
    if _SCI.search(text):
        number = parse_number(text)
        if number is not None:
            plain = format(number.value, "f")
            return plain + ("\\%" if number.percent else "")
    if not _DELIMITED.search(text) and text.count("{") == text.count("}"):
        return "\\boxed{" + text + "}"
    return text


def _parse(mv: Any, text: str) -> list[Any]:
    prepared = _prepare(text)
    parsed = mv.parse(prepared, parsing_timeout=None)
    if not parsed and prepared != text:
        parsed = mv.parse(text, parsing_timeout=None)
    return list(parsed)


def has_absurd_number(text: str) -> bool:
    """True if `text` holds a number with > 100 digits or an exponent beyond 400 (refused, never computed)."""
    return _ABSURD.search(text) is not None


def math_equal(prediction: str, gold: str, *, timeout: float | None = 5.0) -> MathResult:
    """Compare two answer strings with math-verify (gold first, as `verify` expects) within `timeout` s."""
    mv = _math_verify()
    try:
        with deadline(timeout):
            gold_parsed = _parse(mv, gold)
            pred_parsed = _parse(mv, prediction)
            if not gold_parsed or not pred_parsed:
                return "unparsed"
            ok = mv.verify(gold_parsed, pred_parsed, timeout_seconds=None)
            return "equal" if ok else "different"
    except MathTimeout:
        return "timeout"
    except Exception:  # math-verify or sympy failed on this input
        return "unparsed"
