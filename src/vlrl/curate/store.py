"""The resumable per-item results of a curation run: jsonl files appended one line per finished item.

Each rank appends to its own part file (`samples.part-{rank}.jsonl`), flushing and fsyncing after every batch,
so a killed run loses at most the batch in flight. On restart every rank reads all part files and the merged
`samples.jsonl`, skips the ids found there, and first cuts a torn last line off its own part file (a line
without its newline: the write the kill interrupted). A line that does not parse is skipped wherever it is.
Rank 0 merges the parts into `samples.jsonl` at the end (written to a temporary file, then renamed, then
the parts are removed: a kill at any point leaves every finished item readable, at worst twice, and the
first copy wins). `last_logged_step` reads where the run's metrics.jsonl left off, so its step count goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

MERGED = "samples.jsonl"


def part_path(out: Path, rank: int) -> Path:
    return out / f"samples.part-{rank}.jsonl"


def part_paths(out: Path) -> list[Path]:
    return sorted(out.glob("samples.part-*.jsonl"))


def iter_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a jsonl file; lines that are not a JSON object with an "id" (torn, corrupt) are skipped."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                yield record


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """id -> record over the merged file and every part file (the first copy of an id wins)."""
    found: dict[str, dict[str, Any]] = {}
    for path in [out / MERGED, *part_paths(out)]:
        for record in iter_lines(path):
            found.setdefault(record["id"], record)
    return found


def last_logged_step(path: Path) -> int:
    """The step of the last line of a metrics.jsonl (0 when there is none), after cutting a torn last line so
    the next line appended starts on its own line; lines that do not parse are skipped."""
    drop_torn_tail(path)
    last = 0
    if path.exists():
        for raw in path.read_bytes().splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                last = record["step"]
    return last


def drop_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (an interrupted write); returns the number of bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block, pos = 1 << 16, size
        keep = 0
        while pos > 0:  # find the last newline, reading backwards
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
    return size - keep


class ResultLog:
    """Appends records to a jsonl file, one line each, flushed and fsynced after every `write`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_bytes = drop_torn_tail(path)
        self.path = path
        self._f: IO[str] = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_parts(out: Path, order: list[str]) -> dict[str, dict[str, Any]]:
    """Merge the part files into `samples.jsonl`: the ids of `order` first, in that order, then any other id
    already there (from an earlier run on other data). Returns id -> record."""
    results = read_results(out)
    rank = {key: i for i, key in enumerate(order)}
    ids = sorted(results, key=lambda key: (rank.get(key, len(rank)), key))
    tmp = out / (MERGED + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(results[key], ensure_ascii=False) + "\n" for key in ids))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MERGED)
    for path in part_paths(out):
        path.unlink()
    return results
