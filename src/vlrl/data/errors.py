"""`DataError`: every data problem names the file, the record's line and the field."""

from __future__ import annotations

from pathlib import Path

MAX_SHOWN = 1000


def _cut(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text) - MAX_SHOWN} characters cut)"


class DataError(ValueError):
    """A data file or record that cannot be used.

    path: the data file (or image file) at fault, None when unknown.
    line: 1-based line of the record in a jsonl file (index in a JSON list, row in a parquet file), or None.
    field: the record field at fault (e.g. "conversations[0].value", "image"), or None.
    message: what is wrong, in words.

    `str(err)` reads `"{path}:{line}: field '{field}': {message}"`, leaving out the parts that are None; a
    message or field past MAX_SHOWN characters (one quoting a huge value from the data) is cut there, since errors
    are printed.
    """

    def __init__(
        self, path: str | Path | None, line: int | None = None, field: str | None = None, message: str = ""
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        parts = [where] if where else []
        if self.field is not None:
            parts.append(f"field '{_cut(self.field)}'")
        parts.append(_cut(self.message))
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[type[DataError], tuple[str | None, int | None, str | None, str]]:
        # keep the fields through pickling (worker processes), which would otherwise re-call __init__(str)
        return (DataError, (self.path, self.line, self.field, self.message))
