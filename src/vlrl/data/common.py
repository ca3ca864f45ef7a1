"""Helpers every record converter shares: where a record is, its images, placeholders, answers, types."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrl.data.embedded import CONTAINERS, cell_bytes, cell_path, is_ref, make_ref, parse_ref
from vlrl.data.errors import DataError
from vlrl.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_image, check_image_bytes, missing_image
from vlrl.data.sample import IMAGE_PLACEHOLDER, PROBLEM_TYPES
from vlrl.data.screen import TextLimits

# Spellings found in the wild (VLM-R1 / Video-R1 jsonl use "multiple choice", "OCR", "free-form").
# SophiaVL-R1 scores "text" and "caption" answers as free-form text (its reward manager's free_form_compute_score).
_PROBLEM_TYPE_ALIASES = {
    "mcq": "multiple_choice", "yesno": "yes_no", "yes/no": "yes_no", "rec": "grounding",
    "text": "free_form", "caption": "free_form",
}  # fmt: skip
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_BOX = re.compile(r"^\[\s*-?\d+(\.\d+)?\s*(,\s*-?\d+(\.\d+)?\s*){3}\]$")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class ReadContext:
    """Settings of one read, shared by all records of a file."""

    path: Path
    image_root: Path
    check_images: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    problem_type: str | None = None  # fixed / default problem type from the caller or registry
    container: str = "jsonl"  # jsonl | json | parquet | arrow: where embedded image bytes can be referred to
    checked: dict[str, str | None] = field(default_factory=dict)  # image path -> error message or None
    limits: TextLimits = field(default_factory=TextLimits)  # bounds on text and nesting, reserved tokens
    allow_outside_root: bool = False  # relative image paths may climb out of image_root (`../x.png`)

    def at(self, line: int) -> RecordContext:
        return RecordContext(self, line)


@dataclass
class RecordContext:
    """Where one record is: builds located errors and resolves its images."""

    read: ReadContext
    line: int

    @property
    def source(self) -> str:
        return f"{self.read.path}:{self.line}"

    @property
    def default_id(self) -> str:
        return f"{self.read.path.stem}-{self.line}"

    def error(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.read.path, self.line, field_name, message)


def require(record: dict[str, Any], key: str, ctx: RecordContext, what: str = "required field") -> Any:
    """record[key], or a DataError naming the missing key (and the keys that are there)."""
    if key not in record:
        keys = ", ".join(sorted(str(k) for k in record)) or "none"
        raise ctx.error(key, f"missing {what} (present: {keys})")
    return record[key]


def _image_path(value: Any, ctx: RecordContext, field_name: str) -> str:
    """An image value that is not embedded bytes -> an absolute path (or an embedded-image reference as is)."""
    if isinstance(value, dict):  # an HF `Image` struct without bytes, or verl's {"image": path}
        path = cell_path(value) or (value.get("image") if isinstance(value.get("image"), str) else None)
        if not path:
            raise ctx.error(field_name, f"image struct holds neither bytes nor a path: keys {sorted(value)}")
        value = path.removeprefix("file://")
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(field_name, f"image must be a non-empty path string, got {value!r}")
    if is_ref(value):
        return value
    return _inside_root(value, ctx, field_name)


def _inside_root(value: str, ctx: RecordContext, field_name: str) -> str:
    """The absolute path of an image path: a relative one must stay inside image_root (`../../etc/passwd` is
    refused) unless the read allows it. An absolute path is the data's explicit choice (vlrl's own writers
    write them) and is taken as it is; symlinks inside the root may point anywhere (datasets link image
    folders from other disks)."""
    root = os.path.normpath(ctx.read.image_root)
    path = os.path.normpath(os.path.join(root, value))
    if os.path.isabs(value) or ctx.read.allow_outside_root or os.path.commonpath([root, path]) == root:
        return path
    raise ctx.error(field_name, f"image path {value[:200]!r} resolves outside image_root {root}; allow it with "
                    "`allow_outside_image_root: true` in the registry entry (read_file(allow_outside_image_root="
                    "True))")


def _embedded(data: bytes, ctx: RecordContext, column: str, index: int | None, name: str) -> str:
    """The reference to bytes found in the record's cell, after the read's image check on those bytes."""
    if ctx.read.container not in CONTAINERS:
        raise ctx.error(name, f"image bytes in a {ctx.read.container} record: store them in parquet or as files")
    if not data:
        raise ctx.error(name, "unreadable image: the image bytes are empty")
    if ctx.read.check_images:
        check_image_bytes(data, lambda msg: ctx.error(name, msg), max_image_pixels=ctx.read.max_image_pixels)
    return make_ref(ctx.read.container, ctx.read.path, ctx.line, column, index)


def resolve_images(value: Any, ctx: RecordContext, field_name: str = "image") -> list[str]:
    """Image strings from a path, a list of paths, embedded bytes (raw or HF `Image` structs, which become
    references, see `vlrl.data.embedded`), or None (text-only). `field_name` is the record's column. A file's
    existence is always checked; readability (header + verify) when the read asks for it, each distinct file
    once per read, each embedded image from the bytes the reader already holds."""
    if value is None:
        return []
    is_list = isinstance(value, (list, tuple))
    items = value if is_list else [value]
    paths = []
    for i, item in enumerate(items):
        name = f"{field_name}[{i}]" if is_list else field_name
        data = cell_bytes(item)
        if data is not None:
            paths.append(_embedded(data, ctx, field_name, i if is_list else None, name))
            continue
        path = _image_path(item, ctx, name)
        if path not in ctx.read.checked:
            ctx.read.checked[path] = _check(path, ctx.read)
        problem = ctx.read.checked[path]
        if problem is not None:
            raise ctx.error(name, problem)
        paths.append(path)
    return paths


def _check(path: str, read: ReadContext) -> str | None:
    ref = parse_ref(path)
    if ref is None and not os.path.isfile(path):
        return missing_image(path)
    if ref is not None and not os.path.isfile(ref.file):
        return f"data file of the embedded image not found: {ref.file}"
    if read.check_images:
        try:
            check_image(path, max_image_pixels=read.max_image_pixels)
        except DataError as exc:
            return f"{path}: {exc.message}"
    return None


def fit_placeholders(texts: list[str], n_images: int, ctx: RecordContext, field_name: str) -> list[str]:
    """Make the `<image>` placeholders in `texts` (the user turns, in order) match `n_images`.

    Placeholders already present stay where they are and must number exactly `n_images`. When there is
    none at all, `n_images` placeholders are prepended to the first text (VLM-R1 puts images before the
    question)."""
    count = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if count == n_images:
        return texts
    if count == 0 and texts:
        return [IMAGE_PLACEHOLDER * n_images + texts[0], *texts[1:]]
    raise ctx.error(
        field_name, f"{count} {IMAGE_PLACEHOLDER} placeholder(s) in the text but {n_images} image(s)"
    )


def normalize_problem_type(value: Any, ctx: RecordContext | None, field_name: str = "problem_type") -> str:
    """A PROBLEM_TYPES name from common spellings ("multiple choice", "OCR", "free-form" ...)."""
    key = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    key = _PROBLEM_TYPE_ALIASES.get(key, key)
    if key not in PROBLEM_TYPES:
        message = f"unknown problem_type {value!r}; valid: {', '.join(PROBLEM_TYPES)}"
        if ctx is None:
            raise DataError(None, None, field_name, message)
        raise ctx.error(field_name, message)
    return key


def is_number(text: str) -> bool:
    return bool(_NUMBER.match(text.strip()))


def infer_problem_type(answer: str, options: list[str] | None = None) -> str:
    """Best guess when the data does not say: options -> multiple_choice, a 4-number list -> grounding,
    yes/no -> yes_no, a number -> numerical, anything else -> free_form."""
    text = answer.strip()
    if options:
        return "multiple_choice"
    if _BOX.match(text):
        return "grounding"
    if text.lower() in ("yes", "no"):
        return "yes_no"
    if is_number(text):
        return "numerical"
    return "free_form"


def answer_text(value: Any, ctx: RecordContext, field_name: str = "answer") -> str:
    """The ground truth as a string: numbers as written, a list of numbers (a box) as "[x1, y1, x2, y2]"."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (int, float, str)):
        text = str(value).strip()
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        text = "[" + ", ".join(str(v) for v in value) + "]"
    elif value is None:
        raise ctx.error(field_name, "answer is null")
    else:
        text = json.dumps(value, ensure_ascii=False)
    if not text:
        raise ctx.error(field_name, "answer is empty")
    return text


def answer_from_response(response: str) -> str:
    """The content of the last <answer>...</answer> in `response`, else the whole response, stripped."""
    found = _ANSWER_TAG.findall(response)
    return (found[-1] if found else response).strip()


def choices_block(options: list[str]) -> str:
    """The lines that list multiple-choice options under a question: "A. opt" per option, or
    "Choices: A, B, C" when the options are just the letters themselves."""
    letters = LETTERS[: len(options)]
    if [o.strip() for o in options] == list(letters):
        return "Choices: " + ", ".join(letters)
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options))


def options_list(value: Any, ctx: RecordContext, field_name: str = "options") -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ctx.error(field_name, f"options must be a list, got {type(value).__name__}")
    if len(value) > len(LETTERS):
        raise ctx.error(field_name, f"at most {len(LETTERS)} options, got {len(value)}")
    return [str(v) for v in value]
