"""Records of two public benchmarks -> Sample: MATH-Vision (MATH-V) and NLVR."""

from __future__ import annotations

import re
from typing import Any

from vlrl.data.common import (
    RecordContext,
    answer_text,
    choices_block,
    fit_placeholders,
    is_number,
    options_list,
    require,
    resolve_images,
)
from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample

NLVR_INSTRUCTION = "Is this statement true of the image? Answer yes or no."
_MATHV_TAG = re.compile(r"<image(\d+)>")
_MATHV_USED = ("id", "question", "answer", "image", "options")
_NLVR_USED = ("sentence", "label", "identifier", "image")


def mathv_question(question: str, n_images: int) -> tuple[str, list[int]]:
    """Turn MATH-V's `<imageN>` tags into `<image>` placeholders.

    MATH-V ships ONE image file per problem, a composite of every figure the text mentions, while the text
    may name several (`<image1>` ... `<image7>`, sometimes the same one twice). The first mention of each
    `<imageN>` with N <= n_images becomes `<image>`; every other tag becomes the plain text "[imageN]" so
    the sentence still reads and no stray tag is left. Returns the text and, per placeholder in order, the
    0-based image index it stands for (the images are reordered to match)."""
    order: list[int] = []

    def replace(match: re.Match[str]) -> str:
        number = int(match.group(1))
        if 1 <= number <= n_images and number - 1 not in order:
            order.append(number - 1)
            return IMAGE_PLACEHOLDER
        return f"[image{number}]"

    return _MATHV_TAG.sub(replace, question), order


def from_mathv(record: dict[str, Any], ctx: RecordContext) -> Sample:
    """A MATH-V record `{"id", "question", "options", "answer", "solution", "level", "subject", "image"}`.

    Non-empty `options` are listed under the question ("A. opt" lines, or "Choices: A, B, C, D, E" when the
    options are the letters themselves) and make it multiple_choice; otherwise the problem is numerical
    when the answer parses as a number, else math."""
    question = require(record, "question", ctx)
    if not isinstance(question, str) or not question.strip():
        raise ctx.error("question", "must be a non-empty string")
    answer = answer_text(require(record, "answer", ctx), ctx)
    images = resolve_images(require(record, "image", ctx), ctx, "image")
    text, order = mathv_question(question, len(images))
    if order:
        text = fit_placeholders([text], len(order), ctx, "question")[0]  # refuses a stray literal <image>
        rest = [i for i in range(len(images)) if i not in order]  # images no tag names go in front
        text = IMAGE_PLACEHOLDER * len(rest) + text
        images = [images[i] for i in rest] + [images[i] for i in order]
    else:
        text = fit_placeholders([text], len(images), ctx, "question")[0]
    # option texts may name figures of the composite image too ("<image1>"): same plain-text form
    options = [_MATHV_TAG.sub(r"[image\1]", o) for o in options_list(record.get("options"), ctx)]
    if options:
        text = f"{text}\n{choices_block(options)}"
        problem_type = "multiple_choice"
    else:
        problem_type = "numerical" if is_number(answer) else "math"
    metadata = {k: v for k, v in record.items() if k not in _MATHV_USED}
    metadata.update(options=options, task="mathv", source=ctx.source)
    return Sample(
        id=str(record.get("id", ctx.default_id)),
        images=images,
        messages=[{"role": "user", "content": text}],
        answer=answer,
        problem_type=problem_type,
        metadata=metadata,
    )


def from_nlvr(record: dict[str, Any], ctx: RecordContext) -> Sample:
    """An NLVR record `{"sentence", "label": "true"|"false", "identifier", "image"}`: is the sentence true of
    the picture? Answer "yes" / "no" (problem_type yes_no)."""
    sentence = require(record, "sentence", ctx)
    if not isinstance(sentence, str) or not sentence.strip():
        raise ctx.error("sentence", "must be a non-empty string")
    label = require(record, "label", ctx)
    label_text = str(label).strip().lower()
    if label_text not in ("true", "false"):
        raise ctx.error("label", f"must be 'true' or 'false', got {label!r}")
    images = resolve_images(require(record, "image", ctx), ctx, "image")
    text = IMAGE_PLACEHOLDER * len(images) + f"{sentence.strip()}\n{NLVR_INSTRUCTION}"
    metadata = {k: v for k, v in record.items() if k not in _NLVR_USED}
    metadata.update(task="nlvr", source=ctx.source)
    return Sample(
        id=str(record.get("identifier", ctx.default_id)),
        images=images,
        messages=[{"role": "user", "content": text}],
        answer="yes" if label_text == "true" else "no",
        problem_type="yes_no",
        metadata=metadata,
    )
