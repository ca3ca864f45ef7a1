"""The one record every stage passes around: a `Sample`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROBLEM_TYPES = ("multiple_choice", "numerical", "math", "yes_no", "ocr", "free_form", "grounding")
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Sample:
    """One training / evaluation item.

    id: unique within its dataset.
    images: absolute paths of the images, in the order their `<image>` placeholders appear.
    messages: the prompt as chat turns `{"role": "system"|"user"|"assistant", "content": str}`;
        user content holds one `<image>` placeholder per image, where the image stands.
        The final assistant answer is NOT part of `messages` (see `response`).
    answer: the ground truth used by rewards and eval (a letter, a number, "yes", a box "[x1, y1, x2, y2]" ...).
    problem_type: one of PROBLEM_TYPES; selects the accuracy check.
    response: the assistant demonstration for SFT (e.g. "<answer>3</answer>"), None when the data has none.
    metadata: anything else (task, subject, options, image size, coordinate space, source file:line ...).
    """

    id: str
    images: list[str]
    messages: list[dict[str, str]]
    answer: str
    problem_type: str
    response: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"unknown problem_type {self.problem_type!r}; valid: {', '.join(PROBLEM_TYPES)}")

    @property
    def task(self) -> str:
        """The task name used to group results (metadata 'task', else the problem type)."""
        return str(self.metadata.get("task", self.problem_type))
