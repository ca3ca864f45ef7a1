"""Run-directory logging: `metrics.jsonl` (one line per logged step) and `samples.jsonl` (rows), one JSON object a
line; `scalars_of` is what the experiment trackers (`vlrl.train.trackers`) receive of a metrics line.

A kill or a full disk can cut the last line of either file: readers drop such a torn last line (one without its
newline that is not a whole JSON object), and a resume (`truncate_after`) rewrites the file without it. A line
that does not parse anywhere else is damage nobody expects: a DataError naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from vlrl.data.errors import DataError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def scalars_of(line: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics line as written (`MetricsLogger.log`'s return), `step` aside: the scalars
    the trackers get, under the same names. A non-finite value (null in the file) is not sent."""
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


class MetricsLogger:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append `record` (non-finite floats as null); returns the line as written."""
        line = {k: _clean(v) for k, v in record.items()}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        return line

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be logged again) and a torn last line;
        the file is replaced whole (a kill mid-rewrite leaves the old one)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [rec for rec in read_metrics(self.path) if rec.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        os.replace(tmp, self.path)


def parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl text, a torn last line (no newline, not a whole object) dropped."""
    lines = text.split("\n")  # the piece after the last newline is "" unless the last line was cut
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif i < len(lines):  # a whole line (it has its newline) that is not an object
            raise DataError(path, i, None, "not a JSON object: the log is damaged; move it aside to continue")
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl / samples.jsonl (none when it does not exist), a torn last line dropped."""
    return parse_lines(path, path.read_text(errors="replace")) if path.exists() else []
