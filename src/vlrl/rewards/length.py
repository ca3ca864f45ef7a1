"""Length and repetition rewards. These are penalties or shaped rewards, so their ranges differ:

- ``overlong`` in [-1, 0]: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13). With L the
  completion length, L_max = ``max_length`` and L_cache = ``cache_length``:
  0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max; -1 if L > L_max.
- ``cosine`` in [-1, 1] with the defaults: the cosine length scaling of Yeo et al. 2025 ("Demystifying
  Long Chain-of-Thought Reasoning in LLMs"), with open-r1's default values (the paper uses +2/+1 for
  correct, -10/0 for wrong, -10 past the limit):
  r = lo + (hi - lo) * (1 + cos(pi * L / L_max)) / 2, so r = hi at L = 0 and r = lo at L = L_max;
  correct answers: hi = ``max_value_correct`` (1.0, short), lo = ``min_value_correct`` (0.5, long);
  wrong answers: hi = ``min_value_wrong`` (-1.0, short), lo = ``max_value_wrong`` (-0.5, long), i.e. a wrong
  answer is punished less when the model thought longer; L > L_max: ``exceed_value`` (-1.0).
  Correct means `score_answer(...) >= correct_threshold` (0.5); an unscorable item gives None.
- ``repetition`` in [``max_penalty``, 0] (default [-1, 0]): open-r1's ``get_repetition_penalty_reward``:
  words = lower-cased whitespace tokens; with T word n-grams of which U are distinct,
  r = (1 - U / T) * max_penalty; 0 for an empty text or fewer than n words.

Length L, in order of preference: the ``completion_lengths`` keyword (a list of token counts aligned
with the completions, which the trainer passes at run time), else ``sample.metadata["completion_length"]``
(tokens; used only when it is a non-negative int), else counted from the text by ``length_unit``: "whitespace"
(default: whitespace-separated tokens, roughly 0.75 of a BPE token count for English) or "chars" (characters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlrl.rewards.accuracy import SCORE_OPTIONS, score_answer
from vlrl.rewards.registry import register_reward

if TYPE_CHECKING:
    from vlrl.data.sample import Sample

LENGTH_UNITS = ("whitespace", "chars")


def text_length(text: str, unit: str = "whitespace") -> int:
    """Length of `text` in whitespace tokens or characters."""
    if unit == "whitespace":
        return len(text.split())
    if unit == "chars":
        return len(text)
    raise ValueError(f"unknown length_unit {unit!r}; valid: {', '.join(LENGTH_UNITS)}")


def completion_length(
    completion: str, sample: Sample, index: int, completion_lengths: Sequence[int] | None, unit: str
) -> int:
    """Token count from `completion_lengths`, else metadata ``completion_length`` when it is a non-negative int
    (the data may hold anything: -1e400 there made the cosine schedule overflow), else `text_length`."""
    if completion_lengths is not None:
        return int(completion_lengths[index])
    given = sample.metadata.get("completion_length") if isinstance(sample.metadata, dict) else None
    if isinstance(given, int) and not isinstance(given, bool) and given >= 0:
        return given
    return text_length(completion, unit)


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment in [-1, 0] (see module doc)."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return (max_length - cache_length - length) / cache_length
    return -1.0


def cosine_scaled(
    length: int,
    correct: bool,
    max_length: int,
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    exceed_value: float = -1.0,
) -> float:
    """Cosine length-scaled correctness reward (see module doc)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if length > max_length:
        return exceed_value
    hi, lo = (max_value_correct, min_value_correct) if correct else (min_value_wrong, max_value_wrong)
    return lo + (hi - lo) * (1.0 + math.cos(math.pi * length / max_length)) / 2.0


def repetition_penalty(text: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """open-r1 n-gram repetition penalty in [max_penalty, 0] (see module doc)."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


@register_reward("overlong", value_range=(-1.0, 0.0), cheap=True)
def overlong_reward(
    completions: list[str],
    samples: list[Sample],
    *,
    max_length: int = 4096,
    cache_length: int = 1024,
    length_unit: str = "whitespace",
    completion_lengths: Sequence[int] | None = None,
    **_: Any,
) -> list[float | None]:
    """DAPO soft overlong punishment per completion."""
    return [
        overlong_penalty(
            completion_length(c, s, i, completion_lengths, length_unit), max_length, cache_length
        )
        for i, (c, s) in enumerate(zip(completions, samples, strict=True))
    ]


@register_reward("cosine", value_range=(-1.0, 1.0))
def cosine_reward(
    completions: list[str],
    samples: list[Sample],
    *,
    max_length: int = 1024,
    correct_threshold: float = 0.5,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    exceed_value: float = -1.0,
    length_unit: str = "whitespace",
    accuracy_kwargs: dict[str, Any] | None = None,
    completion_lengths: Sequence[int] | None = None,
    **_: Any,
) -> list[float | None]:
    """Correctness (via `score_answer`) scaled by length on a cosine schedule."""
    options = dict(accuracy_kwargs or {})
    unknown = set(options) - SCORE_OPTIONS
    if unknown:
        raise ValueError(
            f"unknown accuracy_kwargs {sorted(unknown)}; valid: {', '.join(sorted(SCORE_OPTIONS))}"
        )
    out: list[float | None] = []
    for i, (c, s) in enumerate(zip(completions, samples, strict=True)):
        score = score_answer(c, s.answer, s.problem_type, metadata=s.metadata, **options)
        if score is None:
            out.append(None)
            continue
        length = completion_length(c, s, i, completion_lengths, length_unit)
        out.append(
            cosine_scaled(
                length,
                score >= correct_threshold,
                max_length,
                min_value_wrong=min_value_wrong,
                max_value_wrong=max_value_wrong,
                min_value_correct=min_value_correct,
                max_value_correct=max_value_correct,
                exceed_value=exceed_value,
            )  # fmt: skip
        )
    return out


@register_reward("repetition", value_range=(-1.0, 0.0), cheap=True)
def repetition_reward(
    completions: list[str], samples: list[Sample], *, ngram_size: int = 3, max_penalty: float = -1.0, **_: Any
) -> list[float | None]:
    """n-gram repetition penalty per completion."""
    return [repetition_penalty(c, ngram_size, max_penalty) for c in completions]
