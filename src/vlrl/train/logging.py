"""Run-directory logging: `metrics.jsonl` (one line per logged step) and `samples.jsonl` (rows), one JSON object a
line; `scalars_of` is what the experiment trackers (`vlrl.train.trackers`) receive of a metrics line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
        """On resume, drop lines of steps after the checkpoint (they will be logged again)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
