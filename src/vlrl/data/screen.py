"""Screening of untrusted records before any converter, tokenizer or writer sees them.

A data file may come from anyone. What would otherwise surface far from the file (a tokenizer growing to many GB
on one huge prompt, a model crashing on a `<|image_pad|>` it did not place, a `UnicodeEncodeError` while writing
results, a `RecursionError` deep in a copy) is refused here as a `DataError` naming the file, the record's line and
the field, so `skip_invalid` can skip it like any other bad record.

Limits (`TextLimits`; the defaults are far above any honest record):
  max_line_bytes  a jsonl line longer than this is refused before it is parsed (DEFAULT_MAX_LINE_BYTES, 16 MiB);
  max_text_chars  any one string of a record longer than this is refused before anything tokenizes it
                  (DEFAULT_MAX_TEXT_CHARS, 100,000 characters);
  max_depth       lists and objects nested deeper than this are refused (DEFAULT_MAX_DEPTH, 64).

Text that reaches the model (the prompt's messages and the demonstration) must not contain `RESERVED_TOKENS`:
every supported model family's vision tokens and the markers its processor writes around an image. `vlrl.data`
sits below `vlrl.models`, so the list lives here; a test checks it holds each family's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

DEFAULT_MAX_LINE_BYTES = 16 * 2**20
DEFAULT_MAX_TEXT_CHARS = 100_000
DEFAULT_MAX_DEPTH = 64

# Qwen-VL's vision tokens, then InternVL's (its `<img>` / `</img>` markers, `<IMG_CONTEXT>`, `<video>`).
RESERVED_TOKENS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
)  # fmt: skip


@dataclass(frozen=True)
class TextLimits:
    """The bounds a record must keep (see the module docstring)."""

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_depth: int = DEFAULT_MAX_DEPTH
    reserved_tokens: tuple[str, ...] = RESERVED_TOKENS


def _key(key: Any) -> str:
    """A key as it may stand in a printed field path: hostile keys (lone surrogates, long) escaped and cut."""
    text = str(key)
    if len(text) > 40 or not text.isprintable() or any("\ud800" <= c <= "\udfff" for c in text):
        return ascii(text[:40])
    return text


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{_key(key)}" if path else _key(key))


def _depth_first(value: Any) -> Iterator[tuple[str, Any, int]]:
    """(field path, item, depth) of `value` and everything inside it, without recursion (a record nested deeper
    than Python's stack is data, not a crash)."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    seen: set[int] = set()  # YAML aliases share (or nest) one object: each container is walked once
    while stack:
        where, item, depth = stack.pop()
        yield where, item, depth
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                if isinstance(key, str):
                    yield _child(where, key), key, depth + 1
                stack.append((_child(where, key), sub, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((_child(where, i), sub, depth + 1) for i, sub in reversed(list(enumerate(item))))


def text_problem(text: str, limits: TextLimits) -> str | None:
    """Why one string of a record cannot be used (too long, a lone surrogate), None when it can."""
    if len(text) > limits.max_text_chars:
        return f"text of {len(text)} characters, more than max_text_chars={limits.max_text_chars}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} at character {exc.start}: not valid Unicode text"
    return None


def record_problem(record: Any, limits: TextLimits) -> tuple[str | None, str] | None:
    """(field path or None, what is wrong) of the first thing in a parsed record that no stage may meet: nesting
    deeper than `max_depth`, a string over `max_text_chars`, a lone surrogate. None when there is none."""
    for where, item, depth in _depth_first(record):
        if depth > limits.max_depth:
            return None, f"nested deeper than max_depth={limits.max_depth} levels (at {where})"
        if isinstance(item, str):
            problem = text_problem(item, limits)
            if problem is not None:
                return where or None, problem
    return None


def reserved_in(texts: list[str], tokens: tuple[str, ...]) -> str | None:
    """The first of `tokens` found in `texts`, None when none is."""
    return next((t for t in tokens if any(t in text for text in texts)), None)


def field_holding(record: Any, token: str, exact: bool = False) -> str | None:
    """The field path of the first string of `record` that contains `token` (`exact`: that is `token`, stripped),
    None when none does."""
    return next((where for where, item, _ in _depth_first(record)
                 if isinstance(item, str) and (item.strip() == token if exact else token in item)), None)


NESTING_MESSAGE = "nested deeper than the JSON parser's recursion limit (max_depth={})"


def bounded_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, raw line) of a binary file, None for a line longer than `max_bytes`, which is read
    past in chunks and never held whole (a 50 MB line costs no 50 MB, and no JSON parse)."""
    number = 0
    while True:
        raw = f.readline(max_bytes + 2)
        if not raw:
            return
        number += 1
        if len(raw.rstrip(b"\r\n")) <= max_bytes:
            yield number, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(2**20)
        yield number, None


def line_too_long(limits: TextLimits) -> str:
    return f"line longer than max_line_bytes={limits.max_line_bytes}: refused before parsing"
