"""The one answer extractor shared by evaluation and training.

`extract_answer(text, modes)` tries each mode in order and returns the first non-empty result:

- ``answer_tag``: the content of the LAST ``<answer>`` tag (case-insensitive), up to the next
  ``</answer>``; a missing closing tag is tolerated (the content then runs to the end of the text).
- ``boxed``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance.
  Nested braces are fine up to `MAX_BRACE_DEPTH`; only the last `MAX_BOXED_CANDIDATES` openings are
  tried, and a candidate is abandoned after `MAX_BOXED_CHARS` characters, so hostile input such as
  10,000 nested ``\\boxed{`` costs linear time.
- ``answer_is``: the rest of the line after the last "the (final) answer is" / "Answer:" / "答案是" / "答案："
  (case-insensitive), without a trailing full stop or markdown bold.
- ``last_line``: the last non-empty line.

`answer_regions(text, modes)` returns the first mode's result (for ``last_line``: the last and the first non-empty
line), for checks that take the first region naming an answer (multiple choice, yes/no);
`without_thinking(text)` drops closed ``<think>`` blocks.

Every mode is linear in the text length (no backtracking regex over the whole text). An empty
match (``<answer></answer>``) counts as "not found" and the next mode is tried. The result is
stripped of surrounding whitespace; `None` means no mode found anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_MODES: tuple[str, ...] = ("answer_tag", "boxed", "answer_is", "last_line")
VALID_MODES: tuple[str, ...] = DEFAULT_MODES
MAX_BRACE_DEPTH = 64
MAX_BOXED_CANDIDATES = 8
MAX_BOXED_CHARS = 20_000

_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(
    r"(?:\bthe\s+(?:final\s+|correct\s+)?answer\s+is\b\s*:?|\banswer\s*[:：]|(?:正确)?答案\s*(?:是|为|[:：])\s*[:：]?)",
    re.IGNORECASE,
)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def _answer_tag(text: str) -> str | None:
    last = None
    for last in _OPEN_TAG.finditer(text):  # noqa: B007 - keep the last match
        pass
    if last is None:
        return None
    close = _CLOSE_TAG.search(text, last.end())
    return text[last.end() : close.start() if close else len(text)]


def _balanced_content(text: str, start: int) -> str | None:
    """Content of the brace group whose '{' is at text[start - 1]; None if unbalanced or too deep/long."""
    depth = 1
    end = min(len(text), start + MAX_BOXED_CHARS)
    i = start
    while i < end:
        ch = text[i]
        if ch == "\\" and i + 1 < end and text[i + 1] in "{}":
            i += 2  # escaped brace \{ or \} (sets) does not change the nesting
            continue
        if ch == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts[-MAX_BOXED_CANDIDATES:]):
        content = _balanced_content(text, start)
        if content is not None and content.strip():
            return content
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` in `text`, or None."""
    return _boxed(text)


def _answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS.finditer(text):  # noqa: B007 - keep the last match
        pass
    if last is None:
        return None
    newline = text.find("\n", last.end())
    rest = text[last.end() : newline if newline >= 0 else len(text)]
    return rest.strip().lstrip("* ").rstrip(" *.")


def _last_line(text: str) -> str | None:
    end = len(text)
    while end > 0:
        start = text.rfind("\n", 0, end) + 1
        line = text[start:end]
        if line.strip():
            return line
        end = start - 1
    return None


_MODES = {"answer_tag": _answer_tag, "boxed": _boxed, "answer_is": _answer_is, "last_line": _last_line}


def check_modes(modes: Sequence[str]) -> None:
    """Raise ValueError naming the valid modes if any of `modes` is unknown."""
    if isinstance(modes, str):
        raise ValueError(f"modes must be a sequence of mode names, not the string {modes!r}")
    for mode in modes:
        if mode not in _MODES:
            raise ValueError(f"unknown extraction mode {mode!r}; valid: {', '.join(VALID_MODES)}")


def _first_line(text: str) -> str | None:
    for line in text.splitlines():
        if line.strip():
            return line
    return None


def answer_regions(text: str, modes: Sequence[str] = DEFAULT_MODES) -> list[str]:
    """Where the answer stands, by the first mode (in `modes` order) that finds one: a one-item list, except
    for ``last_line``, which also gives the first non-empty line (a free-text response may state its answer
    first, then explain). A later mode is never consulted once an earlier one found text: a completion whose
    ``<answer>`` tag holds no readable answer is not rescued by a letter elsewhere in it."""
    check_modes(modes)
    if not isinstance(text, str):
        return []
    for mode in modes:
        found = _MODES[mode](text)
        if found is None or not found.strip():
            continue
        if mode != "last_line":
            return [found.strip()]
        first = _first_line(text)
        return list(dict.fromkeys(r.strip() for r in (found, first) if r is not None and r.strip()))
    return []


def _drop_think_blocks(text: str) -> str:
    """`text` with each closed ``<think>...</think>`` block (leftmost first, shortest) replaced by a newline: what
    ``re.sub(r"<think>.*?</think>", "\\n", text, flags=re.I | re.S)`` gives, in linear time. The lazy regex rescans
    the rest of the text from every ``<think>`` that has no ``</think>`` after it (quadratic: 1 MB of ``<think>``
    took hours); here the search stops at the first opening tag that nothing closes."""
    parts: list[str] = []
    pos = 0
    while True:
        opening = _THINK_OPEN.search(text, pos)
        closing = _THINK_CLOSE.search(text, opening.end()) if opening else None
        if opening is None or closing is None:
            break
        parts += [text[pos : opening.start()], "\n"]
        pos = closing.end()
    parts.append(text[pos:])
    return "".join(parts)


def without_thinking(text: str) -> str:
    """`text` without its closed ``<think>...</think>`` blocks, unless nothing would be left."""
    rest = _drop_think_blocks(text)
    return rest if rest.strip() else text


def extract_answer(text: str, modes: Sequence[str] = DEFAULT_MODES) -> str | None:
    """The model's final answer in `text` by the first mode (in `modes` order) that finds one; see module doc."""
    check_modes(modes)
    if not isinstance(text, str):
        return None
    for mode in modes:
        found = _MODES[mode](text)
        if found is not None and found.strip():
            return found.strip()
    return None
