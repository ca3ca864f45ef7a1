"""Any flat jsonl / parquet table read through a `ColumnMap` -> Sample."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vlrl.data.common import (
    RecordContext,
    answer_text,
    choices_block,
    fit_placeholders,
    infer_problem_type,
    normalize_problem_type,
    options_list,
    require,
    resolve_images,
)
from vlrl.data.errors import DataError
from vlrl.data.sample import Sample

DEFAULT_IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class ColumnMap:
    """Which column holds what. Every name is a column (key) of the records.

    question, answer: required columns.
    image: a column holding one image or a list (null = text-only); None = no images. A row without the
        column is an error, except under the default name "image" (then it is text-only). An image is a path
        relative to the reader's image_root or, in parquet / Arrow, embedded bytes (raw, or Hugging Face
        `Image` structs {"bytes", "path"}), decoded only when loaded (`vlrl.data.embedded`).
    id: the id column; None = "{file stem}-{line}".
    problem_type: a column naming each row's problem type; fixed_problem_type: one type for every row;
        neither = inferred from the answer (options -> multiple_choice, number -> numerical, ...).
    response: a column holding the SFT demonstration.
    options: a column holding a list of choices, listed under the question as "A. opt" lines.
    """

    question: str = "question"
    answer: str = "answer"
    image: str | None = DEFAULT_IMAGE_COLUMN
    id: str | None = None
    problem_type: str | None = None
    fixed_problem_type: str | None = None
    response: str | None = None
    options: str | None = None

    @classmethod
    def from_dict(cls, mapping: dict[str, Any], *, path: str | None = None) -> ColumnMap:
        """Build from a registry entry's `columns:`; an unknown key is an error naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in mapping if k not in valid)
        if unknown:
            raise DataError(
                path, None, "columns", f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        for key, value in mapping.items():
            if value is not None and not isinstance(value, str):
                raise DataError(path, None, f"columns.{key}", f"must be a column name (a string), got {value!r}")
        return cls(**mapping)

    def used(self) -> set[str]:
        names = (
            self.question,
            self.answer,
            self.image,
            self.id,
            self.problem_type,
            self.response,
            self.options,
        )
        return {n for n in names if n is not None}


def from_columns(record: dict[str, Any], ctx: RecordContext, columns: ColumnMap) -> Sample:
    """One row through `columns`. A configured column missing from the row is an error naming it, except
    the image column under its default name "image" (rows without it are text-only)."""

    def column(name: str) -> Any:
        return require(record, name, ctx, what="column")

    question = column(columns.question)
    if not isinstance(question, str) or not question.strip():
        raise ctx.error(columns.question, "question must be a non-empty string")
    answer = answer_text(column(columns.answer), ctx, columns.answer)
    images: list[str] = []
    if columns.image is not None and (columns.image in record or columns.image != DEFAULT_IMAGE_COLUMN):
        images = resolve_images(column(columns.image), ctx, columns.image)
    text = fit_placeholders([question], len(images), ctx, columns.question)[0]

    options: list[str] = []
    if columns.options is not None:
        options = options_list(column(columns.options), ctx, columns.options)
        if options:
            text = f"{text}\n{choices_block(options)}"

    fixed = columns.fixed_problem_type or ctx.read.problem_type
    if columns.problem_type is not None:
        problem_type = normalize_problem_type(column(columns.problem_type), ctx, columns.problem_type)
    elif fixed is not None:
        problem_type = normalize_problem_type(fixed, ctx, "fixed_problem_type")
    else:
        problem_type = infer_problem_type(answer, options)

    response = None
    if columns.response is not None:
        value = column(columns.response)
        if value is not None and not isinstance(value, str):
            raise ctx.error(columns.response, f"response must be a string, got {type(value).__name__}")
        response = value

    metadata = {k: v for k, v in record.items() if k not in columns.used()}
    if options:
        metadata["options"] = options
    metadata["source"] = ctx.source
    record_id = column(columns.id) if columns.id is not None else ctx.default_id
    return Sample(
        id=str(record_id),
        images=images,
        messages=[{"role": "user", "content": text}],
        answer=answer,
        problem_type=problem_type,
        response=response,
        metadata=metadata,
    )
