"""Which data files a dataset path stands for: one file, a folder of shards, a glob, a `save_to_disk` folder.

- a file: itself;
- a glob (`geo3k/data/train-*.parquet`): the files it matches, sorted;
- a folder of parquet shards, directly or under `data/` (the Hugging Face layout
  `data/{split}-0000i-of-0000N.parquet`), or one sub-folder per split (`{split}/0000.parquet`, the Hub's parquet
  conversion): the shards of one split, in shard order;
- a `datasets` `save_to_disk` folder: its Arrow files (`state.json` lists them), or for a `DatasetDict` folder
  (`dataset_dict.json`) those of one split.

`path@split` names the split (EasyR1's and SophiaVL-R1's spelling). Without it, a folder holding one split reads
that one, and one holding several reads `train`, as Hugging Face `datasets` and EasyR1 do.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vlrl.data.errors import DataError

DEFAULT_SPLIT = "train"
# train-00000-of-00002 -> train, also with push_to_hub's hash suffix (train-00000-of-00001-5a2ba4d3c9a2b1ac)
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?$")


@dataclass(frozen=True)
class Source:
    """The data files of one dataset, in reading order. `folder` is what the user named (errors, `Dataset.source`)."""

    files: list[Path]
    folder: Path


def split_spec(spec: str) -> tuple[str, str | None]:
    """`"data/geo3k@test"` -> ("data/geo3k", "test"); a path whose own name holds "@" stays whole when it exists."""
    if "@" not in spec or Path(spec).exists():
        return spec, None
    path, split = spec.rsplit("@", 1)
    return (path, split) if split and "/" not in split else (spec, None)


def is_dataset_path(spec: str) -> bool:
    """Does `spec` (with an optional `@split`) name data on disk: a file, a folder, or a glob that matches?"""
    path, _ = split_spec(spec)
    return Path(path).exists() or (_is_glob(path) and bool(glob.glob(path)))


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _shard_split(path: Path) -> str:
    name = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.stem
    m = _SHARD.match(name)
    return m["split"] if m else name


def _pick_split(folder: Path, by_split: dict[str, list[Path]], split: str | None) -> list[Path]:
    if split is None:
        if len(by_split) == 1:
            return next(iter(by_split.values()))
        split = DEFAULT_SPLIT
    if split not in by_split:
        names = ", ".join(sorted(by_split)) or "(none)"
        raise DataError(folder, None, "split", f"no split {split!r} here; splits: {names} (name one as PATH@SPLIT)")
    return by_split[split]


def _save_to_disk(folder: Path, split: str | None) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = [p.name for p in sorted(folder.iterdir()) if (p / "state.json").is_file()]
        chosen = _pick_split(folder, {s: [folder / s] for s in splits}, split)[0]
        return _save_to_disk(chosen, None)
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / str(f["filename"]) for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(folder / "state.json", None, "_data_files", f"unreadable save_to_disk state: {exc}") from exc
    if split is not None:
        raise DataError(folder, None, "split", f"a save_to_disk Dataset folder has no splits (asked for {split!r})")
    return files


def _parquet_folder(folder: Path, split: str | None) -> list[Path]:
    shards = sorted(folder.glob("*.parquet"))
    if not shards and (folder / "data").is_dir():
        shards = sorted((folder / "data").glob("*.parquet"))
    by_split: dict[str, list[Path]] = {}
    for shard in shards:
        by_split.setdefault(_shard_split(shard), []).append(shard)
    if not shards:  # the Hub's parquet conversion: one folder per split, {split}/0000.parquet
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if any(sub.glob("*.parquet")):
                by_split[sub.name] = sorted(sub.glob("*.parquet"))
    if not by_split:
        raise DataError(folder, None, None, "no data here: no *.parquet shards (nor data/*.parquet, nor "
                        "SPLIT/*.parquet), no save_to_disk state.json or dataset_dict.json")
    return _pick_split(folder, by_split, split)


def resolve_source(spec: str | Path, split: str | None = None) -> Source:
    """The data files `spec` names (see the module doc); `split` wins over a `@split` suffix."""
    path_text, suffix_split = split_spec(str(spec))
    split = split or suffix_split
    path = Path(path_text)
    if path.is_file():
        return Source([path], path)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return Source(_save_to_disk(path, split), path)
        return Source(_parquet_folder(path, split), path)
    if _is_glob(path_text):
        found = sorted(Path(p) for p in glob.glob(path_text) if Path(p).is_file())
        if found:
            return Source(found, path)
        raise DataError(path, None, None, "no data file matches this pattern")
    raise DataError(path, None, None, "data file not found")
