"""Is the answer right? One check per problem type, used by both evaluation and RL training.

`score_answer(prediction_text, answer, problem_type, metadata=...)` extracts the final answer from the
completion (`vlrl.rewards.extract.extract_answer`, unless ``extract=False``) and compares it with the
ground truth. A ground truth wrapped in ``<answer>...</answer>`` is unwrapped first.

Returns a float in [0, 1], or None when the item cannot be scored: a ground truth the check cannot
read (a numerical answer that is not a number, an unknown option letter, a grounding answer without
a box, grounding metadata without ``image_size`` for a scaled coordinate space), or a math-verify
time-out. A completion with no answer, an unreadable answer, or an answer longer than
``max_answer_chars`` (a bound on parsing cost) scores 0.0.

- ``multiple_choice``: the prediction is read as a letter from ``B``, ``(B)``, ``[B]``, ``B.``, ``B)``,
  ``B: text``, ``Answer: B``, ``the answer is B``, ``option B``, or the text of an option
  (``metadata["options"]``: a list in letter order A, B, ... or a dict letter -> text; a leading "A." in
  an option text is ignored); the answer is a letter or an option text. 1.0 / 0.0.
- ``numerical``: `vlrl.rewards.numbers` (integers, decimals, signs, fractions, percents, thousands
  separators, units and currency stripped, scientific notation; bounded), equal within ``rel_tol``
  (relative) or ``abs_tol`` (absolute). Percent rule: ``x%`` matches both ``x`` and ``x/100``.
- ``math``: math-verify (`vlrl.rewards.mathcheck`) within ``math_timeout`` seconds; if math-verify
  cannot parse an answer, the numerical check above, and if the answer is no number either, an exact
  match of the answers with spaces, ``$`` and ``\\left``/``\\right`` removed.
- ``yes_no``: the first word of each, mapped yes/y/true -> yes and no/n/false -> no (case-insensitive).
- ``ocr``: ANLS (`vlrl.rewards.textmatch.anls`) after lower-casing and collapsing whitespace:
  1 - edit distance / max length, 0 when that normalised distance is >= ``anls_threshold`` (0.5).
- ``free_form``: ``free_form_metric="exact"`` (default): SQuAD-normalised exact match;
  ``"rouge_l"``: ROUGE-L F1 of the normalised tokens.
  For ``ocr`` and ``free_form``, ``metadata["answers"]`` may list further acceptable answers (max is taken).
- ``grounding``: `vlrl.rewards.grounding.grounding_score` (IoU against the box(es); ``grounding_metric``
  "hit" = 1[IoU >= iou_threshold] (default), "iou", "mixed", "ap", "vlmr1").

The registered reward ``accuracy`` applies `score_answer` to each (completion, sample) pair.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlrl.data.sample import PROBLEM_TYPES
from vlrl.rewards.extract import DEFAULT_MODES, extract_answer
from vlrl.rewards.grounding import GROUNDING_METRICS, MULTI_BOX_METRICS, grounding_score
from vlrl.rewards.mathcheck import has_absurd_number, math_equal
from vlrl.rewards.numbers import numbers_match, parse_number
from vlrl.rewards.registry import register_reward
from vlrl.rewards.textmatch import anls, normalize_free_form, normalize_ocr, rouge_l_f1

if TYPE_CHECKING:
    from vlrl.data.sample import Sample

FREE_FORM_METRICS = ("exact", "rouge_l")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_ONLY = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?")
_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is\b)?\s*[:：]?\s*)+",
    re.IGNORECASE,
)
_LETTER_THEN_TEXT = re.compile(r"[\(\[]?([A-Z])(?:[\)\].:]|\s*[\)\]]\s*[.:]?)\s*\S")
_KEYWORD_LETTER = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?[:：]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])"
)
_OPTION_PREFIX = re.compile(r"^\s*[\(\[]?[A-Z][\)\].:]\s*")
_DECORATION = re.compile(r"\\(?:text|textbf|mathrm|boxed)\s*\{([^{}]*)\}|\*\*|\$")
_YES = {"yes", "y", "true"}
_NO = {"no", "n", "false"}


def _options(metadata: dict[str, Any]) -> dict[str, str]:
    raw = metadata.get("options")
    if isinstance(raw, dict):
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {_LETTERS[i]: str(v) for i, v in enumerate(raw[: len(_LETTERS)])}
    return {}


def parse_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter a short answer names (see module doc), or None. Letters outside `options` are refused."""
    options = options or {}
    valid = set(options) if options else set(_LETTERS)
    s = text
    for _ in range(3):  # \boxed{\text{B}}: inner wrapper first, then the outer one
        s = _DECORATION.sub(lambda m: m.group(1) or "", s)
    s = re.sub(r"\s+", " ", s).strip()
    letter: str | None = None
    for candidate in (s, _PREFIX.sub("", s)):
        m = _LETTER_ONLY.fullmatch(candidate)
        if m:
            letter = m.group(1).upper()
            break
        m = _LETTER_THEN_TEXT.match(candidate)
        if m:
            letter = m.group(1)
            break
    if letter is None and options:
        target = normalize_free_form(_PREFIX.sub("", s))
        hits = [
            k
            for k, v in options.items()
            if target and normalize_free_form(_OPTION_PREFIX.sub("", v)) == target
        ]
        letter = hits[0] if len(hits) == 1 else None
    if letter is None:
        found = _KEYWORD_LETTER.findall(s)
        letter = found[-1] if found else None
    return letter if letter in valid else None


def _yes_no(text: str) -> str | None:
    words = re.findall(r"[A-Za-z]+", _PREFIX.sub("", text.strip().lstrip("*").strip())[:200])
    if not words:
        return None
    word = words[0].lower()
    return "yes" if word in _YES else "no" if word in _NO else None


def _alternatives(gold: str, metadata: dict[str, Any]) -> list[str]:
    extra = metadata.get("answers")
    more = [str(a) for a in extra] if isinstance(extra, (list, tuple)) else []
    return [gold, *more]


def _loose_math(text: str) -> str:
    return re.sub(r"\s+|\$|\\left|\\right|\\!|\\,", "", text).rstrip(".")


def _score_math(
    pred: str, gold: str, rel_tol: float, abs_tol: float, math_timeout: float | None
) -> float | None:
    if has_absurd_number(gold):
        return None
    if has_absurd_number(pred):
        return 0.0
    verdict = math_equal(pred, gold, timeout=math_timeout)
    if verdict == "equal":
        return 1.0
    if verdict == "different":
        return 0.0
    if verdict == "timeout":
        return None
    gold_number = parse_number(gold)
    if gold_number is not None:
        pred_number = parse_number(pred)
        return float(pred_number is not None and numbers_match(pred_number, gold_number, rel_tol, abs_tol))
    return float(_loose_math(pred) == _loose_math(gold) != "")


def _check_options(
    problem_type: str, free_form_metric: str, grounding_metric: str, multi_box_metric: str
) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}; valid: {', '.join(PROBLEM_TYPES)}")
    if free_form_metric not in FREE_FORM_METRICS:
        raise ValueError(
            f"unknown free_form_metric {free_form_metric!r}; valid: {', '.join(FREE_FORM_METRICS)}"
        )
    if grounding_metric not in GROUNDING_METRICS:
        raise ValueError(
            f"unknown grounding_metric {grounding_metric!r}; valid: {', '.join(GROUNDING_METRICS)}"
        )
    if multi_box_metric not in MULTI_BOX_METRICS:
        raise ValueError(
            f"unknown multi_box_metric {multi_box_metric!r}; valid: {', '.join(MULTI_BOX_METRICS)}"
        )


def score_answer(
    prediction_text: str,
    answer: str,
    problem_type: str,
    *,
    metadata: dict[str, Any] | None = None,
    extract: bool = True,
    modes: Sequence[str] = DEFAULT_MODES,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-9,
    math_timeout: float | None = 5.0,
    anls_threshold: float = 0.5,
    free_form_metric: str = "exact",
    grounding_metric: str = "hit",
    multi_box_metric: str = "ap",
    iou_threshold: float = 0.5,
    iou_alpha: float = 0.5,
    fix_degenerate: bool = True,
    max_answer_chars: int = 2000,
) -> float | None:
    """Correctness of `prediction_text` against `answer` for `problem_type`; see the module doc."""
    _check_options(problem_type, free_form_metric, grounding_metric, multi_box_metric)
    meta = metadata or {}
    gold = str(answer)
    if "<answer>" in gold.lower():
        gold = extract_answer(gold, ("answer_tag",)) or gold
    gold = gold.strip()
    if problem_type == "grounding":
        return grounding_score(
            prediction_text, gold, meta, extract=extract, modes=modes, metric=grounding_metric,
            multi_box_metric=multi_box_metric, iou_threshold=iou_threshold, alpha=iou_alpha,
            fix_degenerate=fix_degenerate,
        )  # fmt: skip
    pred = extract_answer(prediction_text, modes) if extract else str(prediction_text).strip()
    if not pred or len(pred) > max_answer_chars:
        return 0.0
    if problem_type == "multiple_choice":
        options = _options(meta)
        gold_letter = parse_choice(gold, options)
        if gold_letter is None:
            return None
        return float(parse_choice(pred, options) == gold_letter)
    if problem_type == "numerical":
        gold_number = parse_number(gold)
        if gold_number is None:
            return None
        pred_number = parse_number(pred)
        return float(pred_number is not None and numbers_match(pred_number, gold_number, rel_tol, abs_tol))
    if problem_type == "math":
        return _score_math(pred, gold, rel_tol, abs_tol, math_timeout)
    if problem_type == "yes_no":
        gold_yn = _yes_no(gold)
        return None if gold_yn is None else float(_yes_no(pred) == gold_yn)
    golds = _alternatives(gold, meta)
    if problem_type == "ocr":
        return max(anls(normalize_ocr(pred), normalize_ocr(g), anls_threshold) for g in golds)
    if free_form_metric == "rouge_l":
        return max(rouge_l_f1(pred, g) for g in golds)
    return float(any(normalize_free_form(pred) == normalize_free_form(g) for g in golds))


SCORE_OPTIONS = frozenset(
    p.name
    for p in inspect.signature(score_answer).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
) - {"metadata"}


@register_reward("accuracy", params=SCORE_OPTIONS)
def accuracy_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """`score_answer` per (completion, sample); keywords are `score_answer`'s options (others are ignored)."""
    options = {k: v for k, v in kwargs.items() if k in SCORE_OPTIONS}
    return [
        score_answer(c, s.answer, s.problem_type, metadata=s.metadata, **options)
        for c, s in zip(completions, samples, strict=True)
    ]
