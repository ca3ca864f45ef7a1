"""Read a data file into a `Dataset` of validated `Sample`s.

Containers (by content, not name): parquet (`.parquet`), Arrow (`.arrow`, a `datasets` `save_to_disk` file), a
JSON list (the file starts with `[`; LLaVA json), else JSON lines. "line" in errors is the 1-based line of a jsonl
file, the 1-based index in a JSON list, the 1-based row of a parquet or Arrow file. A path may also name several
files read as one dataset: a folder of shards, a glob, a `save_to_disk` folder, `PATH@SPLIT` (`vlrl.data.sources`).

Formats (`format=`, else detected from the first record's keys):
  vlmr1   jsonl of `{"image", "conversations": [{"from", "value"}...]}` (VLM-R1)
  llava   the same records as a JSON list (LLaVA)
  mathv   `{"question" with <image1>, "options", "answer", "subject", "level", "image"}` (MATH-Vision)
  nlvr    `{"sentence", "label", "identifier", "image"}` (NLVR)
  columns any flat records through a `ColumnMap` (default: question / answer / image columns)
  easyr1  EasyR1 / Hugging Face rows `{"problem" with <image>, "answer", "images"}` (alias `hf`)
  sophiavl SophiaVL-R1 rows `{"problem", "solution": "<answer>..</answer>", "path", "problem_type", ...}`
  verl    verl RL rows `{"prompt": [messages], "images", "reward_model": {"ground_truth"}, "ability", ...}`
(see `vlrl.data.frameworks`). Images may be embedded in parquet / Arrow cells (`vlrl.data.embedded`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrl.data.benchmarks import from_mathv, from_nlvr
from vlrl.data.checks import screened
from vlrl.data.columns import ColumnMap, from_columns
from vlrl.data.common import ReadContext, RecordContext, normalize_problem_type
from vlrl.data.conversation import from_conversation
from vlrl.data.embedded import read_arrow_table
from vlrl.data.errors import DataError
from vlrl.data.frameworks import SOPHIAVL_COLUMNS, from_prompt_answer, from_verl
from vlrl.data.images import DEFAULT_MAX_IMAGE_PIXELS
from vlrl.data.sample import Sample
from vlrl.data.screen import NESTING_MESSAGE, TextLimits, bounded_lines, line_too_long
from vlrl.data.sources import resolve_source

FORMATS = ("vlmr1", "llava", "mathv", "nlvr", "columns", "easyr1", "hf", "sophiavl", "verl")
Converter = Callable[[dict[str, Any], RecordContext], Sample]
Record = tuple[int, dict[str, Any] | DataError]


@dataclass
class Dataset:
    """Validated samples of one file (or registry entry).

    samples: the records that passed validation, in file order.
    n_skipped: records dropped because invalid (only with skip_invalid=True).
    errors: one message ("file:line: field 'f': what") per skipped record.
    source: the file read (or the folder / pattern of the files read as one dataset).
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
    if path.suffix.lower() in (".parquet", ".arrow"):
        return path.suffix.lower()[1:]
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def _parsed(path: Path, line: int, raw: bytes | str, limits: TextLimits) -> dict[str, Any] | DataError:
    """One JSON record, or the DataError saying why it is none (invalid JSON, not an object, nested past the
    parser's recursion limit)."""
    try:
        record = json.loads(raw)
    except RecursionError:
        return DataError(path, line, None, NESTING_MESSAGE.format(limits.max_depth))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        msg = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return DataError(path, line, None, f"invalid JSON: {msg}")
    if not isinstance(record, dict):
        return DataError(path, line, None, f"a record must be a JSON object, got {type(record).__name__}")
    return record


def _jsonl(path: Path, limits: TextLimits) -> Iterator[Record]:
    with path.open("rb") as f:
        for line, raw in bounded_lines(f, limits.max_line_bytes):
            if raw is None:
                yield line, DataError(path, line, None, line_too_long(limits))
            elif raw.strip():
                yield line, _parsed(path, line, raw, limits)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SPACE = re.compile(r"[ \t\r\n]*")


def _after_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return pos if match is None else match.end()


def _value_end(text: str, pos: int) -> int:
    """The end of the JSON array or object starting at `pos`, found by bracket counting (no recursion), so that a
    record too deep to parse can be skipped and the ones after it read."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, pos):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return len(text)


def _json_list(path: Path, limits: TextLimits) -> Iterator[Record]:
    """The records of a JSON list. The whole file is parsed before the first record is used (as `json.load`
    would: a syntax error anywhere fails the file first), one element at a time, so that a record nested too
    deep is reported at its own index and the others still read."""
    return iter(list(_json_elements(path, limits)))


def _json_elements(path: Path, limits: TextLimits) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"invalid JSON: {exc}") from exc
    decoder = json.JSONDecoder()
    pos = _after_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(path, None, None, "expected a JSON list of records")
    pos, index = pos + 1, 0
    while True:
        pos = _after_space(text, pos)
        if text.startswith("]", pos) and index == 0:
            pos += 1
            break
        index += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            yield index, DataError(path, index, None, NESTING_MESSAGE.format(limits.max_depth))
            pos = _value_end(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
        else:
            kind = type(record).__name__
            yield index, record if isinstance(record, dict) else DataError(
                path, index, None, f"a record must be a JSON object, got {kind}")
        pos = _after_space(text, pos)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            pos += 1
            break
        else:
            raise DataError(path, text.count("\n", 0, pos) + 1, None, "invalid JSON: expected ',' or ']' after a record")
    if text[pos:].strip():
        raise DataError(path, text.count("\n", 0, pos) + 1, None, "invalid JSON: extra data after the list")


def _rows(path: Path, batches: Iterator[Any], before: int = 0) -> Iterator[Record]:
    row = before
    try:
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(path, row + 1, None, f"unreadable {path.suffix[1:]} file: {exc}") from exc


def _binary_schema(schema: Any) -> bool:
    """Does any column hold binary data (images, at any nesting depth)?"""
    import pyarrow as pa

    def walk(t: Any) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        if pa.types.is_struct(t):
            return any(walk(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return walk(t.value_type)
        return False

    return any(walk(f.type) for f in schema)


def _parquet(path: Path, start: int = 1) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise DataError(path, None, None, f"unreadable parquet file: {exc}") from exc
    # rows of images are read a few at a time: a reader holds one batch's bytes, not the file's
    size = 16 if _binary_schema(pf.schema_arrow) else 1024
    first, before = 0, 0  # the row group holding row `start`, and the rows before it
    while first < pf.metadata.num_row_groups and before + pf.metadata.row_group(first).num_rows < start:
        before += pf.metadata.row_group(first).num_rows
        first += 1
    groups = list(range(first, pf.metadata.num_row_groups))
    rows = _rows(path, pf.iter_batches(batch_size=size, row_groups=groups) if groups else iter(()), before)
    return ((line, record) for line, record in rows if line >= start)


def _arrow(path: Path, start: int = 1) -> Iterator[Record]:
    try:
        table = read_arrow_table(path)
    except (OSError, ValueError) as exc:
        raise DataError(path, None, None, f"unreadable arrow file: {exc}") from exc
    return _rows(path, iter(table.slice(start - 1).to_batches(max_chunksize=16)), start - 1)


def iter_records(path: str | Path, start: int = 1, limits: TextLimits | None = None) -> Iterator[Record]:
    """(line, record) for each record of the file from line (row) `start` on, or (line, DataError) for one that
    is not an object (or a jsonl line over `limits.max_line_bytes`, or nested past the JSON parser's limit).
    Parquet and Arrow files skip to `start` without reading the rows before it."""
    limits = limits or TextLimits()
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "data file not found")
    kind = _container(p)
    if kind == "parquet":
        return _parquet(p, start)
    if kind == "arrow":
        return _arrow(p, start)
    records = _json_list(p, limits) if kind == "json" else _jsonl(p, limits)
    return records if start <= 1 else ((line, r) for line, r in records if line >= start)


def detect_format(record: dict[str, Any], container: str, columns: ColumnMap | None = None) -> str | None:
    """The format a record's keys point to, or None when nothing matches."""
    keys = set(record)
    if "conversations" in keys:
        return "llava" if container == "json" else "vlmr1"
    if {"sentence", "label"} <= keys:
        return "nlvr"
    if {"question", "subject", "level"} <= keys and ("options" in keys or "image" in keys):
        return "mathv"
    if {"prompt", "reward_model"} <= keys:
        return "verl"
    if {"problem", "solution"} <= keys:
        return "sophiavl"
    if "answer" in keys and ("problem" in keys or isinstance(record.get("prompt"), str)):
        return "easyr1"
    if columns is not None or {"question", "answer"} <= keys:
        return "columns"
    return None


def _converter(fmt: str, columns: ColumnMap | None, rename: dict[str, str] | None = None) -> Converter:
    """The format's converter behind the screening every format shares (`vlrl.data.checks.screened`)."""
    return screened(_format_converter(fmt, columns, rename))


def _format_converter(fmt: str, columns: ColumnMap | None, rename: dict[str, str] | None) -> Converter:
    if fmt in ("vlmr1", "llava"):
        return from_conversation
    if fmt in ("easyr1", "hf"):
        return lambda record, ctx: from_prompt_answer(record, ctx, rename)
    if fmt == "sophiavl":
        return lambda record, ctx: from_prompt_answer(record, ctx, SOPHIAVL_COLUMNS if rename is None else rename)
    if fmt == "verl":
        return from_verl
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
    split: str | None = None,
    rename: dict[str, str] | None = None,
    limits: TextLimits | None = None,
    allow_outside_image_root: bool = False,
) -> Dataset:
    """Read and validate every record of `path`: a data file, or several read as one dataset (a folder of
    parquet shards, a glob, a `save_to_disk` folder, `PATH@SPLIT`; see `vlrl.data.sources`).

    format: one of FORMATS, else detected from the first record. columns: the ColumnMap (or its dict) for
    format "columns" (giving one implies that format). image_root: folder image paths are relative to
    (default: each data file's folder). problem_type: the problem type of records that do not say (fixed for
    column maps; MATH-V and NLVR records follow their own rules). check_images: also open each image (header +
    verify; embedded images from the bytes read); existence is always checked.
    skip_invalid: drop invalid records, counting them in `n_skipped` / `errors`, instead of raising the first
    error. limit: stop after this many valid samples. Duplicate ids are invalid records. split: the split of a
    folder holding several. rename: SophiaVL-R1's source column -> role map (formats easyr1 / sophiavl).
    limits: the bounds on lines, strings and nesting and the reserved tokens (`vlrl.data.screen.TextLimits`).
    allow_outside_image_root: accept relative image paths that climb out of image_root (`../x.png`); refused
    by default, since a data file from elsewhere could name any file of the machine.
    """
    limits = limits or TextLimits()
    p = Path(path)
    if format is not None and format not in FORMATS:
        raise DataError(p, None, "format", f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    cmap = ColumnMap.from_dict(columns, path=str(p)) if isinstance(columns, dict) else columns
    if problem_type is not None:
        try:
            problem_type = normalize_problem_type(problem_type, None)
        except DataError as exc:
            raise DataError(p, None, exc.field, exc.message) from exc
    source = resolve_source(p, split)
    dataset = Dataset(source=str(source.folder))
    convert: Converter | None = None
    seen: set[str] = set()
    for file in source.files:
        container = _container(file)
        root = Path(os.path.abspath(image_root if image_root is not None else file.parent))
        read = ReadContext(file, root, check_images, max_image_pixels, problem_type, container=container,
                           limits=limits, allow_outside_root=allow_outside_image_root)
        for line, record in iter_records(file, limits=limits):
            if limit is not None and len(dataset.samples) >= limit:
                return dataset
            if convert is None and isinstance(record, dict):  # the first object decides; failing that is fatal
                convert = _converter(_pick_format(file, line, record, format, cmap, container), cmap, rename)
            try:
                if isinstance(record, DataError):
                    raise record
                assert convert is not None
                sample = convert(record, read.at(line))
                if sample.id in seen:
                    raise DataError(file, line, "id", f"duplicate id {sample.id!r}")
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
        keys = ", ".join(ascii(k)[:40] for k in sorted(record)[:20])  # hostile keys: escaped, bounded
        raise DataError(
            path,
            line,
            None,
            f"cannot tell the format from the keys ({keys}); pass format= one of "
            f"{', '.join(FORMATS)} (or a column map)",
        )
    return found
