"""The kept set on disk, in the schema of its input.

A VLM-R1 jsonl / LLaVA record (`conversations`) is written back as it was read: every field of the input
line is kept, re-read from the file and line the `Sample` came from (`metadata["source"]`). Two fields may
change so that the file reads back anywhere: the image path(s) become absolute (the image root was the input
file's folder), and a record without an `id` gets the one the reader gave it. Records of other formats
(MATH-V, NLVR, column-mapped tables) are written as VLM-R1 jsonl by `vlrl.curate.audit.to_vlmr1`. The
statistics go under a `curate` key. `--parquet` writes the same records as a parquet table (read back as
VLM-R1 records: `read_file` detects `conversations` in parquet rows too).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlrl.curate.audit import to_vlmr1
from vlrl.data.formats import iter_records
from vlrl.data.sample import Sample


def source_of(sample: Sample) -> tuple[str, int] | None:
    """(file, line) of the record a sample was read from ("file:line" in metadata), or None."""
    src = sample.metadata.get("source")
    if not isinstance(src, str) or ":" not in src:
        return None
    path, _, line = src.rpartition(":")
    return (path, int(line)) if line.isdigit() else None


def raw_records(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """sample id -> its input record as read from disk (each source file read once); samples whose record
    cannot be found (no source, file gone) are left out."""
    wanted: dict[str, dict[int, str]] = defaultdict(dict)
    for s in samples:
        src = source_of(s)
        if src is not None:
            wanted[src[0]][src[1]] = s.id
    out: dict[str, dict[str, Any]] = {}
    for path, lines in wanted.items():
        if not Path(path).is_file():
            continue
        for line, record in iter_records(path):
            if line in lines and isinstance(record, dict):
                out[lines[line]] = record
    return out


def _absolute_images(record: dict[str, Any], sample: Sample) -> dict[str, Any]:
    key = "image" if "image" in record or "images" not in record else "images"
    value = record.get(key)
    if value is None or not sample.images:
        return record
    if isinstance(value, (list, tuple)):
        record[key] = list(sample.images)
    else:
        record[key] = sample.images[0] if len(sample.images) == 1 else list(sample.images)
    return record


def output_record(sample: Sample, raw: dict[str, Any] | None, stats: dict[str, Any]) -> dict[str, Any]:
    """The kept record: the input record (VLM-R1 / LLaVA) or its VLM-R1 conversion, plus `curate`."""
    if raw is not None and "conversations" in raw:
        record = _absolute_images(json.loads(json.dumps(raw, default=str)), sample)
        record.setdefault("id", sample.id)
    else:
        record = to_vlmr1(sample)
    record["curate"] = stats
    return record


def write_kept(records: Sequence[dict[str, Any]], out: Path, parquet: bool = False) -> list[Path]:
    """kept.jsonl (and kept.parquet); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kept.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    paths = [path]
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(list(records))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"the kept records do not fit one parquet schema ({err}); use kept.jsonl") from err
        pq.write_table(table, out / "kept.parquet")
        paths.append(out / "kept.parquet")
    return paths
