"""Reading run directories for the report: metrics.jsonl, samples.jsonl, eval results and summaries.

Everything here tolerates a run still being written (a half-written last line is skipped and counted) and
files from older versions (samples.jsonl rows without `images` / `prompt`): a report describes what is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY_FILES = ("summary.json", "report.json")  # `make demo`'s summary; `vlrl curate`'s report


@dataclass
class Run:
    """One run directory as the report sees it.

    metrics: metrics.jsonl lines in order; samples: the RL rollout rows of samples.jsonl (rows with a
    `completion`; curation's per-item rows are not rollouts of a step); skipped: lines that were not JSON
    objects (a line being written when the report was made).
    """

    name: str
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON-object lines of `path`, how many other non-blank lines were skipped); ([], 0) when absent."""
    if not path.is_file():
        return [], 0
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def load_run(path: Path, name: str | None = None) -> Run:
    metrics, bad_m = read_jsonl(path / METRICS)
    samples, bad_s = read_jsonl(path / SAMPLES)
    rollouts = [s for s in samples if "completion" in s and isinstance(s.get("step"), int)]
    return Run(name or path.name, path, metrics, rollouts, bad_m + bad_s)


def find_runs(root: Path) -> list[Run]:
    """The run at `root` (it holds metrics.jsonl), else every sub-folder of `root` that holds one (a folder of
    runs, such as `runs/demo`: its stages side by side)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    if (root / METRICS).is_file():
        return [load_run(root)]
    runs = [load_run(p) for p in sorted(root.iterdir()) if (p / METRICS).is_file()]
    if not runs:
        raise FileNotFoundError(f"{root}: no {METRICS} in it or in its sub-folders (is it a run directory?)")
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def eval_results(dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """{name: results} of the `vlrl eval` results files (JSON objects with `accuracy` and `n`) in `dirs` and
    their `eval/` sub-folders; the name is the file's stem, with its folder when two stems collide."""
    found: dict[Path, dict[str, Any]] = {}
    for d in dirs:
        for folder in (d, d / "eval"):
            for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                data = _read_json(p)
                if isinstance(data, dict) and "accuracy" in data and "n" in data:
                    found.setdefault(p.resolve(), data)
    stems = [p.stem for p in found]
    return {(p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}"): data for p, data in found.items()}


def summaries(root: Path) -> dict[str, dict[str, Any]]:
    """{file name: content} of the summary files at `root` (the demo's summary.json, curation's report.json)."""
    out = {}
    for name in SUMMARY_FILES:
        data = _read_json(root / name)
        if isinstance(data, dict):
            out[name] = data
    return out


def validation_rows(run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the run's validation evaluations: step and every `val_*` key, one row per
    metrics line that has one (`val_accuracy` first, then per task)."""
    rows = [m for m in run.metrics if any(k.startswith("val_") for k in m)]
    keys: dict[str, None] = {}
    for m in rows:
        keys.update((k, None) for k in m if k.startswith("val_"))
    cols = sorted(keys, key=lambda k: (k != "val_accuracy", not k.startswith("val_accuracy"), k))
    return ["step", *cols], rows
