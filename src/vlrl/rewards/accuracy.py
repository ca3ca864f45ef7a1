"""Is the answer right? One check per problem type, used by both evaluation and RL training.

`score_answer(prediction_text, answer, problem_type, metadata=...)` finds the answer in the completion and
compares it with the ground truth. A ground truth wrapped in ``<answer>...</answer>`` is unwrapped first.
Which library decides:

- ``math`` and ``numerical``: math-verify (`vlrl.rewards.mathcheck`): the verdict is math-verify's whenever
  it reads both sides, under ``math_timeout`` seconds, with ``math_targets`` (its extraction configs,
  ``latex`` and ``expr``), ``float_rounding``, ``math_strict`` and ``math_set_relation`` passed to it. The prediction it reads is the
  content of the last ``<answer>`` tag, or, when there is none, the whole completion without its closed
  ``<think>`` blocks (math-verify's own extraction then takes ``\\boxed{}`` first, then the last expression);
  with ``modes`` that allow neither ``answer_is`` nor ``last_line``, only a tag or ``\\boxed{}`` is read.
  Only where math-verify reads nothing from one side, and ``expr`` is among the targets, the bounded number
  reader `vlrl.rewards.numbers` compares the two as numbers; a ``math`` answer that is no number either
  falls back to exact match with spaces, ``$`` and ``\\left``/``\\right`` removed. ``numerical`` with
  ``rel_tol`` > 0 compares the numbers within that relative tolerance instead (ChartQA's relaxed accuracy
  is 0.05); percent rule there: ``x%`` matches ``x`` and ``x/100``.
- ``multiple_choice``: `vlrl.rewards.choice`: the letter (or option text) named where the answer stands: the
  last answer tag if there is one, else ``\\boxed{}``, else the "the answer is" / "答案是" line, else the last
  line, then the first line
  (``C (145°)``, ``(D) 8``, ``Option C``, ``\\boxed{C}``, ``I think it is B``); the gold is a letter or an
  option's text (``metadata["options"]``: a list in letter order A, B, ... or a dict letter -> text).
- ``yes_no``: the first word of that region (the last line, then the first), mapped yes/y/true/是/对 -> yes and no/n/false/否/不 -> no.
- ``ocr``: ANLS (`vlrl.rewards.textmatch.anls`) after lower-casing and collapsing whitespace:
  1 - edit distance / max length, 0 when that normalised distance is >= ``anls_threshold`` (0.5).
- ``free_form``: ``free_form_metric="exact"`` (default): SQuAD-normalised exact match;
  ``"rouge_l"``: ROUGE-L F1 of the normalised tokens.
  For ``ocr`` and ``free_form``, ``metadata["answers"]`` may list further acceptable answers (max is taken).
- ``grounding``: `vlrl.rewards.grounding.grounding_score` (IoU against the box(es); ``grounding_metric``
  "hit" = 1[IoU >= iou_threshold] (default), "iou", "mixed", "ap", "vlmr1").

Returns a float in [0, 1], or None when the item cannot be scored: a ground truth the check cannot read
(a numerical answer that is not a number, an unknown option letter, a grounding answer without a box,
grounding metadata without ``image_size`` for a scaled coordinate space), or a math-verify time-out. A
completion with no answer or an unreadable answer scores 0.0. Parsing cost is bounded by
``max_answer_chars`` (2,000): a multiple-choice answer text longer than that is read from its last
``max_answer_chars`` characters (where final answers stand), a math text from its last
`MATH_CHARS_FACTOR` times as many (math-verify finds a "final answer is" that a model's rambling
follows; its time is bounded by ``math_timeout``); an OCR or free-form answer longer than that scores 0.0.

The registered reward ``accuracy`` applies `score_answer` to each (completion, sample) pair.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlrl.data.sample import PROBLEM_TYPES
from vlrl.rewards.choice import choice_score, clean, options_of
from vlrl.rewards.extract import DEFAULT_MODES, answer_regions, check_modes, extract_answer, without_thinking
from vlrl.rewards.grounding import GROUNDING_METRICS, MULTI_BOX_METRICS, grounding_score
from vlrl.rewards.mathcheck import TARGETS, has_absurd_number, is_number, math_equal
from vlrl.rewards.numbers import numbers_match, parse_number
from vlrl.rewards.registry import register_reward
from vlrl.rewards.textmatch import anls, normalize_free_form, normalize_ocr, rouge_l_f1

if TYPE_CHECKING:
    from vlrl.data.sample import Sample

FREE_FORM_METRICS = ("exact", "rouge_l")
MATH_CHARS_FACTOR = 10
_YES = {"yes", "y", "true", "是", "对", "正确"}
_NO = {"no", "n", "false", "否", "不", "不是", "错", "错误"}
_YES_NO_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\b)?\s*[:：]?\s*|(?:正确)?答案\s*(?:是|为)?\s*[:：]?\s*)+",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z]+|不是|正确|错误|[是对否不错]")


def _yes_no(text: str) -> str | None:
    words = _WORD.findall(_YES_NO_PREFIX.sub("", clean(text))[:200])
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


def _tail(text: str, limit: int) -> str:
    """The last `limit` characters of `text`, from a line start when one is in reach."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    newline = tail.find("\n")
    return tail[newline + 1 :] if 0 <= newline < limit // 2 else tail


def _math_region(text: str, modes: Sequence[str], extract: bool, limit: int) -> str | None:
    """What math-verify reads of a completion (see module doc)."""
    if not extract:
        return _tail(str(text).strip(), limit) or None
    if "answer_tag" in modes:
        tagged = extract_answer(text, ("answer_tag",))
        if tagged is not None:
            return _tail(tagged, limit)
    if "answer_is" in modes or "last_line" in modes:
        whole = without_thinking(text).strip()
        return _tail(whole, limit) or None
    if "boxed" in modes:
        return extract_answer(text, ("boxed",))
    return None


def _score_math(
    pred: str, gold: str, *, numerical: bool, math_timeout: float | None, targets: tuple[str, ...],
    float_rounding: int, strict: bool, set_relation: bool, abs_tol: float,
) -> float | None:  # fmt: skip
    if has_absurd_number(gold):
        return None
    if has_absurd_number(pred):
        return 0.0
    verdict = math_equal(pred, gold, timeout=math_timeout, targets=targets, float_rounding=float_rounding,
                         strict=strict, set_relation=set_relation)  # fmt: skip
    if verdict == "timeout":
        return None
    if verdict != "unparsed":
        return float(verdict == "equal")
    if "expr" not in targets:  # the caller asked for LaTeX only: plain numbers are not answers
        return 0.0
    gold_number = parse_number(gold)
    if gold_number is None:
        return None if numerical else float(_loose_math(pred) == _loose_math(gold) != "")
    pred_number = parse_number(pred) or parse_number(extract_answer(pred) or "")
    return float(pred_number is not None and numbers_match(pred_number, gold_number, 0.0, abs_tol))


def _score_tolerant(pred: str, gold: str, rel_tol: float, abs_tol: float) -> float | None:
    gold_number = parse_number(gold)
    if gold_number is None:
        return None
    pred_number = parse_number(pred) or parse_number(extract_answer(pred) or "")
    return float(pred_number is not None and numbers_match(pred_number, gold_number, rel_tol, abs_tol))


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
    rel_tol: float = 0.0,
    abs_tol: float = 1e-9,
    math_timeout: float | None = 5.0,
    math_targets: Sequence[str] = TARGETS,
    float_rounding: int = 6,
    math_strict: bool = True,
    math_set_relation: bool = False,
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
    check_modes(modes)
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
    if not isinstance(prediction_text, str):
        return 0.0
    if problem_type in ("math", "numerical"):
        region = _math_region(prediction_text, modes, extract, MATH_CHARS_FACTOR * max_answer_chars)
        if problem_type == "numerical" and rel_tol > 0:
            return (
                None if parse_number(gold) is None else _score_tolerant(region or "", gold, rel_tol, abs_tol)
            )
        if problem_type == "numerical" and not is_number(gold, timeout=math_timeout):
            return None
        if not region:
            return 0.0
        return _score_math(
            region, gold, numerical=problem_type == "numerical", math_timeout=math_timeout,
            targets=tuple(math_targets), float_rounding=float_rounding, strict=math_strict,
            set_relation=math_set_relation, abs_tol=abs_tol,
        )  # fmt: skip
    if extract:
        regions = answer_regions(prediction_text, modes)
    else:
        regions = [prediction_text.strip()] if prediction_text.strip() else []
    if problem_type == "multiple_choice":
        return choice_score([_tail(r, max_answer_chars) for r in regions], gold, options_of(meta))
    if problem_type == "yes_no":
        gold_yn = _yes_no(gold)
        if gold_yn is None:
            return None
        found = next((yn for yn in map(_yes_no, regions) if yn is not None), None)
        return float(found == gold_yn)
    pred = regions[0] if regions else ""
    if not pred or len(pred) > max_answer_chars:
        return 0.0
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
