"""The end of a curation run (rank 0): statistics recomputed from the saved samples, the band filter, and the
files: stats.jsonl (every item), kept.jsonl / kept.parquet (the kept records), report.json (+ printed text).

Everything here reads only the samples file, so a run re-filtered with another band, threshold or ranking
(`vlrl curate` again with the same sampling settings) samples nothing and rewrites these files at once.

A run the time budget stopped before every item was sampled gets `finish_partial` instead: report.json says how
far it got (`complete: false`), and the files derived from a whole item set (stats, kept) are removed, so none
from an earlier run on other data outlives it; the next run that completes writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlrl.curate.filter import ItemStats, item_stats, select, summarize
from vlrl.curate.records import output_record, raw_records, write_kept
from vlrl.data.sample import Sample


@dataclass(frozen=True)
class FilterSpec:
    """How items are judged once sampled: the pass threshold, where pass@1 comes from, the band, the ranking."""

    threshold: float
    pass1: str
    band: tuple[float, float]
    rank_by_gap: bool = False
    max_keep: int | None = None
    parquet: bool = False


def stats_of(record: dict[str, Any], threshold: float, pass1: str) -> ItemStats:
    """An item's statistics from its line in the samples file (sample rewards and the greedy reward)."""
    rewards = [s.get("reward") for s in record["samples"]]
    greedy = record.get("greedy")
    if pass1 == "greedy" and greedy is None:
        raise ValueError(f"item {record['id']!r} has no greedy completion; it was sampled with pass1=first")
    return item_stats(rewards, threshold=threshold, pass1=pass1,
                      greedy=greedy.get("reward") if greedy is not None else None)


def finish(samples: Sequence[Sample], results: dict[str, dict[str, Any]], spec: FilterSpec, out: Path,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write stats.jsonl, kept.jsonl (+ parquet) and report.json for `samples` (all must have results)."""
    missing = [s.id for s in samples if s.id not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) have no samples (first: {missing[0]!r})")
    stats = [(s.id, stats_of(results[s.id], spec.threshold, spec.pass1)) for s in samples]
    kept_ids = select(stats, spec.band, rank_by_gap=spec.rank_by_gap, max_keep=spec.max_keep)
    kept_set = set(kept_ids)
    with (out / "stats.jsonl").open("w", encoding="utf-8") as f:
        for (key, st), s in zip(stats, samples):
            f.write(json.dumps({"id": key, "task": s.task, **st.to_dict(), "kept": key in kept_set}) + "\n")
    by_id = {s.id: s for s in samples}
    stat_of = dict(stats)
    kept_samples = [by_id[k] for k in kept_ids]
    raws = raw_records(kept_samples)
    records = [output_record(s, raws.get(s.id), stat_of[s.id].to_dict()) for s in kept_samples]
    paths = write_kept(records, out, parquet=spec.parquet)
    summary = summarize([st for _, st in stats], len(kept_ids))
    report = {"complete": True, **summary, "band": list(spec.band), "threshold": spec.threshold, "pass1": spec.pass1,
              "rank_by_gap": spec.rank_by_gap, "max_keep": spec.max_keep,
              "by_task": _by_task(samples, stat_of, kept_set),
              "files": {"kept": [str(p) for p in paths], "stats": str(out / "stats.jsonl"),
                        "samples": str(out / "samples.jsonl")}, **(extra or {})}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


DERIVED = ("stats.jsonl", "kept.jsonl", "kept.parquet")


def finish_partial(out: Path, items_done: int, items_total: int, extra: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Write report.json for a run stopped before every item was sampled and remove the derived files."""
    for name in DERIVED:
        (out / name).unlink(missing_ok=True)
    report = {"complete": False, "items_done": items_done, "items_total": items_total,
              "files": {"samples": str(out / "samples.jsonl")}, **(extra or {})}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _by_task(samples: Sequence[Sample], stat_of: dict[str, ItemStats], kept: set[str]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        row = out.setdefault(s.task, {"n": 0, "kept": 0, "pass_rate_sum": 0.0})
        row["n"] += 1
        row["kept"] += s.id in kept
        row["pass_rate_sum"] += stat_of[s.id].pass_rate
    return {task: {"n": r["n"], "kept": r["kept"], "mean_pass_rate": r["pass_rate_sum"] / r["n"]}
            for task, r in sorted(out.items())}
