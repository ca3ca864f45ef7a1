"""Multiple choice: which option a response names, in the forms models write it.

`parse_choice(text, options)` reads the option letter from one short text, trying in order:

1. the whole text is a letter form: ``B``, ``b``, ``(B)``, ``[B]``, ``B.``, ``B)``, ``B:``;
2. a letter opens the text and the option follows: ``B. dog``, ``B: dog``, ``(B) dog``, ``B) dog``,
   ``C (145°)``, or ``C 145°`` when the rest equals option C's text;
3. the text is one option's text (``dog``; ``145`` for an option ``145°``: numbers compare by value);
4. a letter after a keyword, the last one: ``the answer is B``, ``Option C``, ``answer: (D)``,
   ``答案是 (D)``, ``选 D``, ``correct choice is C because ...``;
5. exactly one distinct bracketed letter: ``... so (C) is right``;
6. exactly one distinct valid letter standing alone as a word (``I think it is B``); a capital ``A``
   followed by a lower-case word other than a verb or conjunction (``A triangle``) is the article;
7. exactly one option's text standing in the text as whole words (``the angle is 145°``).

Decoration is removed first: ``\\boxed{}``, ``\\text{}``, ``\\mathrm{}``, ``\\textbf{}``, markdown ``**``,
``$``, full-width brackets and colons, a trailing full stop (``.`` or ``。``). A letter never matches
inside a word (the ``B`` of ``Bob`` is no answer). Letters outside `options` (when given) are refused.

`choice_score(regions, gold, options)` compares the letter of the first region that names one with the
gold, which is a letter or an option's text. Without options a gold text is compared with the text the
response gives after its letter (``C (145°)`` against gold ``145°``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vlrl.rewards.numbers import parse_number
from vlrl.rewards.textmatch import normalize_free_form

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WRAPPER = re.compile(r"\\(?:boxed|text|textbf|textrm|mathrm|mathbf|fbox)\s*\{([^{}]*)\}")
_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "：": ":", "【": "[", "】": "]", "，": ",", "．": "."})
_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\s*,?\s*|(?:the\s+)?(?:final\s+|correct\s+|best\s+)?"
    r"(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be)?\s*[:\-]?\s*|(?:正确)?答案\s*(?:是|为|應為|应为)?\s*:?\s*"
    r"|选项\s*|选择\s*|选\s*)+",
    re.IGNORECASE,
)
_LETTER_ONLY = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)、]?")
_BRACKET_FIRST = re.compile(r"[(\[]([A-Z])[)\]]\s*[.:]?\s*(.*)", re.DOTALL)
_DELIM_FIRST = re.compile(r"([A-Z])\s*[.:)、]\s*(.*)", re.DOTALL)
_PAREN_TEXT = re.compile(r"([A-Z])\s+\((.*)\)")
_SPACE_TEXT = re.compile(r"([A-Z])\s+(.+)", re.DOTALL)
_KEYWORD = re.compile(
    r"(?:(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*)?[:\-]?|(?:答案|选项|选择|选)\s*(?:是|为)?\s*:?)"
    r"\s*[(\[]?([A-Z])[)\]]?(?![A-Za-z])"
)
_BRACKETED = re.compile(r"[(\[]([A-Z])[)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’\\])([A-Z])(?![A-Za-z0-9'’])(?: ([a-z]+))?")
_NOT_NOUNS = {
    "and",
    "or",
    "nor",
    "is",
    "was",
    "are",
    "seems",
    "looks",
    "would",
    "could",
    "should",
    "might",
    "must",
    "can",
    "will",
    "fits",
    "matches",
    "shows",
    "vs",
    "versus",
    "then",
    "but",
}
_OPTION_PREFIX = re.compile(r"^\s*[(\[]?[A-Z][)\].:]\s*")


def options_of(metadata: dict[str, Any]) -> dict[str, str]:
    """`metadata["options"]` as letter -> text: a list in letter order, or a dict keyed by letter."""
    raw = metadata.get("options")
    if isinstance(raw, dict):
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {LETTERS[i]: str(v) for i, v in enumerate(raw[: len(LETTERS)])}
    return {}


def clean(text: str) -> str:
    """Decoration removed (see module doc), whitespace collapsed."""
    s = text.translate(_FULL_WIDTH)
    for _ in range(3):  # \boxed{\text{B}}: inner wrapper first, then the outer one
        s = _WRAPPER.sub(lambda m: m.group(1), s)
    s = s.replace("**", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = re.sub(r"\s+", " ", s).strip().strip("\"'`").strip()
    return s.rstrip("。.!！ ").strip()


def _option_text(text: str) -> str:
    return normalize_free_form(_OPTION_PREFIX.sub("", text))


def same_text(a: str, b: str) -> bool:
    """Equal after SQuAD normalisation, or both one number of the same value (``145`` vs ``145°``)."""
    na, nb = normalize_free_form(a), normalize_free_form(b)
    if na and na == nb:
        return True
    pa, pb = parse_number(a), parse_number(b)
    return pa is not None and pb is not None and pa.value == pb.value and pa.percent == pb.percent


def _unique(letters: Sequence[str]) -> str | None:
    distinct = set(letters)
    return distinct.pop() if len(distinct) == 1 else None


def _letter_first(s: str, options: dict[str, str]) -> str | None:
    for pattern in (_BRACKET_FIRST, _DELIM_FIRST, _PAREN_TEXT):
        m = pattern.fullmatch(s)
        if m:
            return m.group(1)
    m = _SPACE_TEXT.fullmatch(s)
    if m and m.group(1) in options and same_text(m.group(2), _OPTION_PREFIX.sub("", options[m.group(1)])):
        return m.group(1)
    return None


def _by_option_text(s: str, options: dict[str, str]) -> str | None:
    return _unique([k for k, v in options.items() if same_text(s, _OPTION_PREFIX.sub("", v))])


def _standalone(s: str, valid: set[str]) -> str | None:
    found = [
        m.group(1)
        for m in _STANDALONE.finditer(s)
        if not (
            m.group(1) == "A" and m.group(2) and m.group(2) not in _NOT_NOUNS
        )  # "A triangle": the article
    ]
    return _unique([x for x in found if x in valid])


def _contained_option(s: str, options: dict[str, str]) -> str | None:
    padded = f" {normalize_free_form(s)} "
    texts = {k: _option_text(v) for k, v in options.items()}
    hits = [
        k for k, t in texts.items() if (len(t) > 1 or t.isdigit()) and f" {t} " in padded
    ]  # not a bare letter
    return _unique(hits)


def parse_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter `text` names (see module doc), or None."""
    options = options or {}
    valid = set(options) if options else set(LETTERS)
    s = clean(text)
    stripped = _PREFIX.sub("", s).strip()
    for candidate in dict.fromkeys((s, stripped)):
        m = _LETTER_ONLY.fullmatch(candidate)
        letter = m.group(1).upper() if m else _letter_first(candidate, options)
        if letter is None and options:
            letter = _by_option_text(candidate, options)
        if letter is not None:
            return letter if letter in valid else None
    steps = (
        lambda: _unique([x for x in _KEYWORD.findall(s)[-1:] if x in valid]),
        lambda: _unique([x for x in _BRACKETED.findall(s) if x in valid]),
        lambda: _standalone(s, valid if options else set(LETTERS[:8])),
        lambda: _contained_option(s, options) if options else None,
    )
    for step in steps:
        letter = step()
        if letter is not None:
            return letter
    return None


def _text_after_letter(text: str) -> str:
    s = _PREFIX.sub("", clean(text)).strip()
    for pattern in (_BRACKET_FIRST, _DELIM_FIRST, _PAREN_TEXT):
        m = pattern.fullmatch(s)
        if m:
            return m.group(2)
    return s


def gold_letter(gold: str, options: dict[str, str]) -> str | None:
    """The gold's letter: a letter form (valid for `options`), else the option whose text the gold is."""
    s = clean(gold)
    m = _LETTER_ONLY.fullmatch(s)
    if m and (not options or m.group(1).upper() in options):
        return m.group(1).upper()
    return _by_option_text(s, options) if options else None


def choice_score(regions: Sequence[str], gold: str, options: dict[str, str]) -> float | None:
    """1.0 / 0.0: does the first region that names an option name the gold's? None if the gold is unreadable.

    `regions` are candidate answer texts in order of trust (answer tag, boxed, "answer is", last line, ...).
    """
    want = gold_letter(gold, options)
    if want is None and options:
        return None
    if want is not None:
        for region in regions:
            got = parse_choice(region, options)
            if got is not None:
                return float(got == want)
        return 0.0
    for region in regions:  # no options and the gold is an option's text: compare the first answer's text
        rest = _text_after_letter(region)
        if rest:
            return float(same_text(rest, gold))
    return 0.0
