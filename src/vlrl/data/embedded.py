"""Images stored inside a data file (parquet, or the Arrow files of a `datasets` `save_to_disk` folder).

A `Sample` keeps image *references*, never bytes: `Sample.images` stays a list of strings, and an embedded image
is the string

    parquet:/abs/path/train-00000-of-00002.parquet:3:images[0]
    arrow:/abs/path/data-00000-of-00001.arrow:3:image

= container, data file, 1-based row, field (a column, `[i]` for the i-th image of a list column). It reads like
the `file:row: field` of a `DataError`, and `vlrl.data.images.load_image` / `image_size` / `check_image` resolve
it: the bytes are read from the file only when the image is loaded (one row group of one column, kept in a small
cache), so a dataset of many images costs memory for its text only, and the string travels through pickling,
jsonl files (curation's kept records) and every stage that passes `Sample`s on.

A cell holding an image is raw bytes, or a Hugging Face `Image` feature struct `{"bytes": ..., "path": ...}`
(bytes win; `path` is then only the original file name).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrl.data.errors import DataError

CONTAINERS = ("parquet", "arrow")
_REF = re.compile(r"^(?P<container>parquet|arrow):(?P<file>.+):(?P<row>\d+):(?P<field>[^:]+)$")
_FIELD = re.compile(r"^(?P<column>.+?)(?:\[(?P<index>\d+)\])?$")
_CACHE_BYTES = 256 * 2**20  # column chunks kept for reuse: one HF shard's row group of images is far below this
_OPEN_FILES = 16


@dataclass(frozen=True)
class EmbeddedRef:
    """Where one embedded image is: `file` (absolute), 1-based `row`, `column`, `index` in a list column."""

    container: str
    file: str
    row: int
    column: str
    index: int | None = None

    @property
    def field(self) -> str:
        return self.column if self.index is None else f"{self.column}[{self.index}]"

    def __str__(self) -> str:
        return f"{self.container}:{self.file}:{self.row}:{self.field}"

    def error(self, message: str) -> DataError:
        return DataError(self.file, self.row, self.field, message)


def make_ref(container: str, file: str | Path, row: int, column: str, index: int | None = None) -> str:
    """The reference string of the image at (file, row, column[index])."""
    if container not in CONTAINERS:
        raise ValueError(f"unknown container {container!r}; valid: {', '.join(CONTAINERS)}")
    if ":" in column or "[" in column:
        raise DataError(file, row, column, "a column holding embedded images must not have ':' or '[' in its name")
    return str(EmbeddedRef(container, os.path.abspath(file), row, column, index))


def parse_ref(value: str) -> EmbeddedRef | None:
    """The `EmbeddedRef` that `value` names, or None when it is an ordinary path."""
    m = _REF.match(value)
    if m is None:
        return None
    f = _FIELD.match(m["field"])
    assert f is not None  # the pattern matches any non-empty text
    index = None if f["index"] is None else int(f["index"])
    return EmbeddedRef(m["container"], m["file"], int(m["row"]), f["column"], index)


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and _REF.match(value) is not None


def cell_bytes(value: Any) -> bytes | None:
    """The image bytes a cell holds (raw bytes or an HF `Image` struct with bytes), else None."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray, memoryview)):
        return bytes(value["bytes"])
    return None


def cell_path(value: Any) -> str | None:
    """The original file name an HF `Image` struct records (`path`), None when there is none."""
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return str(value["path"])
    return None


class _Store:
    """Open data files and recently read column chunks, shared by the threads of one process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[str, Any] = OrderedDict()  # path -> (ParquetFile, row-group starts) | Table
        self.chunks: OrderedDict[tuple[str, int, str], Any] = OrderedDict()  # (file key, row group, column)
        self.chunk_bytes = 0

    def _file(self, ref: EmbeddedRef) -> Any:
        st = os.stat(ref.file)
        key = f"{ref.container}:{ref.file}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"  # a rewritten file is new
        if key in self.files:
            self.files.move_to_end(key)
            return key, self.files[key]
        if ref.container == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(ref.file)
            starts, total = [], 0
            for i in range(pf.metadata.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(i).num_rows
            handle: Any = (pf, starts, total)
        else:
            handle = read_arrow_table(Path(ref.file))  # memory-mapped: no pixel data is resident
        self.files[key] = handle
        while len(self.files) > _OPEN_FILES:
            self.files.popitem(last=False)
        return key, handle

    def cell(self, ref: EmbeddedRef) -> Any:
        with self.lock:
            key, handle = self._file(ref)
            if ref.container == "arrow":
                if ref.row > handle.num_rows or ref.column not in handle.column_names:
                    raise ref.error(f"no such cell in {ref.file} ({handle.num_rows} rows)")
                return handle.column(ref.column)[ref.row - 1].as_py()
            pf, starts, total = handle
            if ref.row > total or ref.column not in pf.schema_arrow.names:
                raise ref.error(f"no such cell in {ref.file} ({total} rows)")
            group = max(i for i, s in enumerate(starts) if s < ref.row)
            chunk_key = (key, group, ref.column)
            if chunk_key in self.chunks:
                self.chunks.move_to_end(chunk_key)
                chunk = self.chunks[chunk_key]
            else:
                chunk = pf.read_row_group(group, columns=[ref.column]).column(0)
                self.chunks[chunk_key] = chunk
                self.chunk_bytes += chunk.nbytes
                while self.chunk_bytes > _CACHE_BYTES and len(self.chunks) > 1:
                    self.chunk_bytes -= self.chunks.popitem(last=False)[1].nbytes
            return chunk[ref.row - 1 - starts[group]].as_py()


_STORE = _Store()


def read_arrow_table(path: Path) -> Any:
    """An Arrow IPC file (stream format, as `datasets` writes it, or file format) as a memory-mapped Table."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def read_ref(ref: EmbeddedRef | str) -> tuple[bytes, str | None]:
    """(image bytes, original file name or None) of an embedded image; `DataError` at file:row: field."""
    r = parse_ref(ref) if isinstance(ref, str) else ref
    if r is None:
        raise DataError(str(ref), None, None, "not an embedded-image reference")
    if not os.path.isfile(r.file):
        raise r.error("data file not found (it holds this embedded image)")
    try:
        value = _STORE.cell(r)
    except DataError:
        raise
    except (OSError, ValueError, IndexError) as exc:  # pyarrow's errors are OSError / ValueError subclasses
        raise r.error(f"cannot read the embedded image: {exc}") from exc
    if r.index is not None:
        if not isinstance(value, list) or r.index >= len(value):
            raise r.error("no such image in the list")
        value = value[r.index]
    data = cell_bytes(value)
    if data is None:
        raise r.error("the cell holds no image bytes")
    return data, cell_path(value)
