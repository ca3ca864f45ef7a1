"""What every format's converter is wrapped in: the record screened before it is converted (`vlrl.data.screen`),
the Sample checked after, so a record that would fail later (in a tokenizer, the model, a writer, a reward that
can never match) fails here with `file:line: field`.

After conversion:
  - the text that reaches the model (messages, demonstration) holds none of the read's reserved tokens (the
    field named is the record's string holding the token; metadata may hold them, the model never sees it);
  - a grounding answer holds a box (four numbers, in any of the forms the box rewards read);
  - a multiple-choice answer with known options names one: a letter among them (`B`, `(B)`, `B.`), an option's
    text, or a letter followed by its option's text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

from vlrl.data.common import LETTERS, RecordContext
from vlrl.data.sample import Sample
from vlrl.data.screen import field_holding, record_problem, reserved_in

Converter = Callable[[dict[str, Any], RecordContext], Sample]
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_LETTER = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?(?:\s+(.*))?$", re.DOTALL)
_NOT_WORD = re.compile(r"[\W_]+")
_DECORATION = re.compile(r"\\(?:boxed|text|textbf|textrm|mathrm|mathbf|fbox)\b|[${}*`'\"]")


_NO_OBJECT = ("[]", "none", "null")  # a grounding gold saying the object is absent (the rewards score it)


def holds_box(answer: str) -> bool:
    """Whether a grounding answer can be a box: four numbers or more (`[x1, y1, x2, y2]`, `(x1,y1),(x2,y2)`,
    `{"bbox_2d": [...]}`, `<box>...</box>`), or "no object" (`[]`, `none`). Text without them ("the cat") can
    never score."""
    return answer.strip().lower() in ("", *_NO_OBJECT) or len(_NUMBER.findall(answer)) >= 4


def _plain(text: str) -> str:
    return _NOT_WORD.sub(" ", _DECORATION.sub(" ", text)).strip().casefold()


def names_an_option(answer: str, options: list[str]) -> bool:
    """Whether `answer` may name one of `options`. Refused (False) only when surely not, since the choice reward
    reads golds in many forms (decorated letters, option texts, numbers by value): a bare letter beyond the
    options (`E` of three) that is no word of theirs, or a text without digits whose words are in no option's text,
    is in none and holds none (`horse` for cat / dog). Options that are all punctuation or symbols cannot be judged:
    accepted."""
    answer = unicodedata.normalize("NFKC", answer)  # full-width `（A` and `A：` are `(A` and `A:` to the reward
    options = [unicodedata.normalize("NFKC", o) for o in options]  # and compared alike
    text = _DECORATION.sub(" ", answer).strip()
    match = _LETTER.match(text)
    if match is not None and match.group(1).upper() in LETTERS[: len(options)]:
        return True
    plain, texts = _plain(text), [_plain(o) for o in options]
    if not plain or not all(texts) or any(c.isdigit() for c in plain):
        return True
    joined = _plain(_DECORATION.sub("", answer))  # `E$E` is `EE` to the reward, which drops `$` in place
    words = set(plain.split())  # word by word: `B` is the text of option `A: B`, `<box>B` of `<box>A:B`
    return any(plain in p or p in plain or joined in p or words <= set(p.split()) for p in texts)


def _answer_field(record: dict[str, Any], answer: str) -> str:
    """The record's field that gave the answer: `answer` when it has one, else the string that is (or holds) it
    (SophiaVL's `solution`, verl's `reward_model.ground_truth`, the final gpt turn)."""
    if "answer" in record:
        return "answer"
    return field_holding(record, answer, exact=True) or field_holding(record, answer) or "answer"


def check_sample(sample: Sample, record: dict[str, Any], ctx: RecordContext) -> None:
    """Refuse a converted Sample the model or the rewards cannot use (module docstring)."""
    texts = [m["content"] for m in sample.messages] + ([sample.response] if sample.response else [])
    token = reserved_in(texts, ctx.read.limits.reserved_tokens)
    if token is not None:
        raise ctx.error(field_holding(record, token), f"text holds the reserved token {token!r} (a model's "
                        "special token; the model would read it as an image slot)")
    answer_field = _answer_field(record, sample.answer)
    if sample.problem_type == "grounding" and not holds_box(sample.answer):
        raise ctx.error(answer_field, f"grounding answer {sample.answer[:80]!r} is not a box [x1, y1, x2, y2]")
    options = sample.metadata.get("options")
    if sample.problem_type == "multiple_choice" and isinstance(options, list) and options:
        texts = [str(o) for o in options]
        if not names_an_option(sample.answer, texts):
            raise ctx.error(answer_field, f"multiple-choice answer {sample.answer[:80]!r} is not among the options "
                            f"({', '.join(LETTERS[: len(texts)])} or their texts)")


def screened(convert: Converter) -> Converter:
    """`convert` behind the screening of its record and the checks of its Sample."""

    def run(record: dict[str, Any], ctx: RecordContext) -> Sample:
        problem = record_problem(record, ctx.read.limits)
        if problem is not None:
            raise ctx.error(*problem)
        sample = convert(record, ctx)
        check_sample(sample, record, ctx)
        return sample

    return run
