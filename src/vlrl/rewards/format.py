"""Format rewards: does the completion follow the ``<think>...</think><answer>...</answer>`` layout?

Registered rewards (all cheap: linear string scans, no regex backtracking):

- ``format`` (strict, DeepSeek-R1 / VLM-R1): 1.0 iff ``re.fullmatch(STRICT_PATTERN, text, re.DOTALL)``
  with ``STRICT_PATTERN = ^<think>.*?</think>\\s*<answer>.*?</answer>$``: the text starts with ``<think>``,
  ends with ``</answer>`` (nothing, not even a newline, after it), and somewhere between holds
  ``</think>``, optional whitespace, ``<answer>``. Computed without the two lazy ``.*?`` (which can
  backtrack quadratically on hostile text) but with the same result. Values {0, 1}.
- ``format_lenient``: 1.0 iff ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` occur in this order,
  anything around or between. Values {0, 1}.
- ``answer_format``: 1.0 iff the text holds exactly one ``<answer>`` and exactly one ``</answer>``, in
  that order, with non-blank content between. Values {0, 1}.
- ``tag_count`` (open-r1's ``tag_count_reward``): +0.25 for each of ``<think>``, ``</think>``,
  ``<answer>``, ``</answer>`` that occurs exactly once. With ``newlines=True`` the tags are counted with
  open-r1's surrounding newlines (``<think>\\n``, ``\\n</think>\\n``, ``\\n<answer>\\n``, ``\\n</answer>``).
  Values {0, 0.25, 0.5, 0.75, 1}.

Tags are case-sensitive, as the prompt templates spell them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vlrl.rewards.registry import register_reward

if TYPE_CHECKING:
    from vlrl.data.sample import Sample

STRICT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
_JOIN = re.compile(r"</think>\s*<answer>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_NEWLINE_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def strict_format(text: str) -> bool:
    """Same truth value as ``re.fullmatch(STRICT_PATTERN, text, re.DOTALL)``, in linear time."""
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return False
    return _JOIN.search(text, len("<think>"), len(text) - len("</answer>")) is not None


def lenient_format(text: str) -> bool:
    """``<think>``, ``</think>``, ``<answer>``, ``</answer>`` in this order (earliest matches suffice)."""
    pos = 0
    for tag in _TAGS:
        found = text.find(tag, pos)
        if found < 0:
            return False
        pos = found + len(tag)
    return True


def single_answer(text: str) -> bool:
    """Exactly one ``<answer>`` and one ``</answer>``, in order, with non-blank content."""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    start = text.find("<answer>") + len("<answer>")
    end = text.find("</answer>")
    return end >= start and bool(text[start:end].strip())


def tag_count(text: str, newlines: bool = False) -> float:
    """0.25 per tag occurring exactly once (see module doc)."""
    tags = _NEWLINE_TAGS if newlines else _TAGS
    return 0.25 * sum(text.count(tag) == 1 for tag in tags)


def _texts(completions: list[str]) -> list[str]:
    return [c if isinstance(c, str) else "" for c in completions]


@register_reward("format", cheap=True)
def format_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
    """Strict R1 format: 1.0 / 0.0."""
    return [float(strict_format(c)) for c in _texts(completions)]


@register_reward("format_lenient", cheap=True)
def format_lenient_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
    """Both tag pairs in order, anything around: 1.0 / 0.0."""
    return [float(lenient_format(c)) for c in _texts(completions)]


@register_reward("answer_format", cheap=True)
def answer_format_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
    """One well-formed, non-empty ``<answer>...</answer>``: 1.0 / 0.0."""
    return [float(single_answer(c)) for c in _texts(completions)]


@register_reward("tag_count", cheap=True)
def tag_count_reward(
    completions: list[str], samples: list[Sample], *, newlines: bool = False, **_: Any
) -> list[float | None]:
    """0.25 per correctly counted tag, in [0, 1]."""
    return [tag_count(c, newlines) for c in _texts(completions)]
