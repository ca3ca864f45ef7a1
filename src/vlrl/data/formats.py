"""Read a data file into a `Dataset` of validated `Sample`s.

Containers (by content, not name): parquet (`.parquet`), a JSON list (the file starts with `[`; LLaVA
json), else JSON lines. "line" in errors is the 1-based line of a jsonl file, the 1-based index in a JSON
list, the 1-based row of a parquet file.

Formats (`format=`, else detected from the first record's keys):
  vlmr1   jsonl of `{"image", "conversations": [{"from", "value"}...]}` (VLM-R1)
  llava   the same records as a JSON list (LLaVA)
  mathv   `{"question" with <image1>, "options", "answer", "subject", "level", "image"}` (MATH-Vision)
  nlvr    `{"sentence", "label", "identifier", "image"}` (NLVR)
  columns any flat records through a `ColumnMap` (default: question / answer / image columns)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrl.data.benchmarks import from_mathv, from_nlvr
from vlrl.data.columns import ColumnMap, from_columns
from vlrl.data.common import ReadContext, RecordContext, normalize_problem_type
from vlrl.data.conversation import from_conversation
from vlrl.data.errors import DataError
from vlrl.data.images import DEFAULT_MAX_IMAGE_PIXELS
from vlrl.data.sample import Sample

FORMATS = ("vlmr1", "llava", "mathv", "nlvr", "columns")
Converter = Callable[[dict[str, Any], RecordContext], Sample]
Record = tuple[int, dict[str, Any] | DataError]


@dataclass
class Dataset:
    """Validated samples of one file (or registry entry).

    samples: the records that passed validation, in file order.
    n_skipped: records dropped because invalid (only with skip_invalid=True).
    errors: one message ("file:line: field 'f': what") per skipped record.
    source: the file read.
    template: the prompt template the registry entry asks for (see `vlrl.data.templates`), None if unset.
    split: the registry entry's split label, None if unset.
    """

    samples: list[Sample] = field(default_factory=list)
    n_skipped: int = 0
    errors: list[str] = field(default_factory=list)
    source: str = ""
    template: str | None = None
    split: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def _container(path: Path) -> str:
    if path.suffix.lower() == ".parquet":
        return "parquet"
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                msg = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                yield line, DataError(path, line, None, f"invalid JSON: {msg}")
                continue
            if not isinstance(record, dict):
                yield (
                    line,
                    DataError(
                        path, line, None, f"a record must be a JSON object, got {type(record).__name__}"
                    ),
                )
                continue
            yield line, record


def _json_list(path: Path) -> Iterator[Record]:
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except ValueError as exc:
        raise DataError(path, None, None, f"invalid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield index, record
        else:
            yield (
                index,
                DataError(path, index, None, f"a record must be a JSON object, got {type(record).__name__}"),
            )


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(path, None, None, f"unreadable parquet file: {exc}") from exc


def iter_records(path: str | Path) -> Iterator[Record]:
    """(line, record) for each record of the file, or (line, DataError) for one that is not an object."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "data file not found")
    kind = _container(p)
    if kind == "parquet":
        return _parquet(p)
    return _json_list(p) if kind == "json" else _jsonl(p)


def detect_format(record: dict[str, Any], container: str, columns: ColumnMap | None = None) -> str | None:
    """The format a record's keys point to, or None when nothing matches."""
    keys = set(record)
    if "conversations" in keys:
        return "llava" if container == "json" else "vlmr1"
    if {"sentence", "label"} <= keys:
        return "nlvr"
    if {"question", "subject", "level"} <= keys and ("options" in keys or "image" in keys):
        return "mathv"
    if columns is not None or {"question", "answer"} <= keys:
        return "columns"
    return None


def _converter(fmt: str, columns: ColumnMap | None) -> Converter:
    if fmt in ("vlmr1", "llava"):
        return from_conversation
    if fmt == "mathv":
        return from_mathv
    if fmt == "nlvr":
        return from_nlvr
    cmap = columns or ColumnMap()
    return lambda record, ctx: from_columns(record, ctx, cmap)


def read_file(
    path: str | Path,
    *,
    format: str | None = None,
    columns: ColumnMap | dict[str, Any] | None = None,
    image_root: str | Path | None = None,
    problem_type: str | None = None,
    check_images: bool = True,
    skip_invalid: bool = False,
    limit: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Dataset:
    """Read and validate every record of `path`.

    format: one of FORMATS, else detected from the first record. columns: the ColumnMap (or its dict) for
    format "columns" (giving one implies that format). image_root: folder image paths are relative to
    (default: the data file's folder). problem_type: the problem type of records that do not say (fixed for
    column maps; MATH-V and NLVR records follow their own rules). check_images: also open each image (header + verify); existence is always checked.
    skip_invalid: drop invalid records, counting them in `n_skipped` / `errors`, instead of raising the first
    error. limit: stop after this many valid samples. Duplicate ids are invalid records.
    """
    p = Path(path)
    if format is not None and format not in FORMATS:
        raise DataError(p, None, "format", f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    cmap = ColumnMap.from_dict(columns, path=str(p)) if isinstance(columns, dict) else columns
    if problem_type is not None:
        try:
            problem_type = normalize_problem_type(problem_type, None)
        except DataError as exc:
            raise DataError(p, None, exc.field, exc.message) from exc
    records = iter_records(p)
    container = _container(p)
    root = Path(os.path.abspath(image_root if image_root is not None else p.parent))
    read = ReadContext(p, root, check_images, max_image_pixels, problem_type)
    dataset = Dataset(source=str(p))
    convert: Converter | None = None
    seen: set[str] = set()
    for line, record in records:
        if limit is not None and len(dataset.samples) >= limit:
            break
        if convert is None and isinstance(record, dict):  # the first object decides; failing that is fatal
            convert = _converter(_pick_format(p, line, record, format, cmap, container), cmap)
        try:
            if isinstance(record, DataError):
                raise record
            assert convert is not None
            sample = convert(record, read.at(line))
            if sample.id in seen:
                raise DataError(p, line, "id", f"duplicate id {sample.id!r}")
        except DataError as exc:
            if not skip_invalid:
                raise
            dataset.n_skipped += 1
            dataset.errors.append(str(exc))
            continue
        seen.add(sample.id)
        dataset.samples.append(sample)
    return dataset


def _pick_format(
    path: Path, line: int, record: dict[str, Any], fmt: str | None, cmap: ColumnMap | None, container: str
) -> str:
    if fmt is not None:
        return fmt
    found = "columns" if cmap is not None else detect_format(record, container)
    if found is None:
        keys = ", ".join(sorted(record))
        raise DataError(
            path,
            line,
            None,
            f"cannot tell the format from the keys ({keys}); pass format= one of "
            f"{', '.join(FORMATS)} (or a column map)",
        )
    return found
