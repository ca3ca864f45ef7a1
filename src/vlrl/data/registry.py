"""A dataset registry file (YAML or JSON), in the spirit of SophiaVL-R1's / LLaMA-Factory's dataset_info.json:

    counting:                      # the name load_dataset() takes
      file: synth/counting/train.jsonl   # relative to the registry file's folder
      format: vlmr1                # optional; detected from the first record otherwise
      image_root: synth/counting   # optional; default: the data file's folder
      template: answer             # optional; the prompt template training / eval apply
      split: train                 # optional label
    my_table:
      file: tables/q.parquet
      columns: {question: q, answer: a, image: img_path}
      problem_type: numerical      # every row (or a `problem_type` column in `columns`)

`load_dataset(spec)` takes a registry name or a path to a data file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from vlrl.data.columns import ColumnMap
from vlrl.data.errors import DataError
from vlrl.data.formats import FORMATS, Dataset, read_file
from vlrl.data.templates import TEMPLATES

REGISTRY_ENV = "VLRL_DATA_REGISTRY"


@dataclass(frozen=True)
class RegistryEntry:
    """One registered dataset; relative paths are already resolved against the registry's folder."""

    name: str
    file: str
    format: str | None = None
    image_root: str | None = None
    columns: ColumnMap | None = None
    problem_type: str | None = None
    template: str | None = None
    split: str | None = None


_ENTRY_KEYS = tuple(f.name for f in fields(RegistryEntry) if f.name != "name")


def _parse_file(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, None, None, "registry file not found")
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.safe_load(f)  # JSON is YAML too
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise DataError(path, line, None, f"invalid registry: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise DataError(path, None, None, f"invalid registry: {exc}") from exc


def _entry(path: Path, name: str, raw: Any) -> RegistryEntry:
    if not isinstance(raw, dict):
        raise DataError(path, None, name, f"an entry must be a mapping with at least 'file', got {raw!r}")
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if unknown:
        raise DataError(
            path, None, name, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(_ENTRY_KEYS)}"
        )
    if not isinstance(raw.get("file"), str) or not raw["file"]:
        raise DataError(path, None, f"{name}.file", "missing required field (the data file path)")
    if raw.get("format") is not None and raw["format"] not in FORMATS:
        raise DataError(
            path, None, f"{name}.format", f"unknown format {raw['format']!r}; valid: {', '.join(FORMATS)}"
        )
    if raw.get("template") is not None and raw["template"] not in TEMPLATES:
        raise DataError(
            path,
            None,
            f"{name}.template",
            f"unknown template {raw['template']!r}; valid: {', '.join(TEMPLATES)}",
        )
    columns = raw.get("columns")
    if columns is not None and not isinstance(columns, dict):
        raise DataError(path, None, f"{name}.columns", "must be a mapping of role -> column name")
    base = path.parent

    def resolve(p: str | None) -> str | None:
        return None if p is None else os.path.normpath(os.path.join(base, os.path.expanduser(str(p))))

    return RegistryEntry(
        name=name,
        file=str(resolve(raw["file"])),
        format=raw.get("format"),
        image_root=resolve(raw.get("image_root")),
        columns=None if columns is None else ColumnMap.from_dict(columns, path=f"{path} ({name})"),
        problem_type=raw.get("problem_type"),
        template=raw.get("template"),
        split=None if raw.get("split") is None else str(raw["split"]),
    )


def load_registry(path: str | Path) -> dict[str, RegistryEntry]:
    """Every entry of a registry file, validated (unknown keys, formats and templates are errors)."""
    p = Path(path)
    data = _parse_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(p, None, None, f"a registry is a mapping of name -> entry, got {type(data).__name__}")
    return {str(name): _entry(p, str(name), raw) for name, raw in data.items()}


def default_registry() -> str | None:
    """The registry named by $VLRL_DATA_REGISTRY, if set."""
    return os.environ.get(REGISTRY_ENV) or None


def load_dataset(
    spec: str,
    *,
    registry: str | None = None,
    skip_invalid: bool = False,
    image_root: str | None = None,
    format: str | None = None,
    check_images: bool = True,
    limit: int | None = None,
    columns: ColumnMap | dict[str, Any] | None = None,
    problem_type: str | None = None,
) -> Dataset:
    """Load `spec`: a name in the registry (`registry`, else $VLRL_DATA_REGISTRY) or a path to a data file.

    Keyword arguments given here override the registry entry's. A name that is neither registered nor an
    existing file is a `DataError` listing the registered names."""
    registry = registry or default_registry()
    entries = load_registry(registry) if registry else {}
    entry = entries.get(spec)
    if entry is None:
        if Path(spec).is_file():
            return read_file(
                spec,
                format=format,
                columns=columns,
                image_root=image_root,
                problem_type=problem_type,
                check_images=check_images,
                skip_invalid=skip_invalid,
                limit=limit,
            )
        if registry:
            known = ", ".join(sorted(entries)) or "(none)"
            raise DataError(
                registry, None, None, f"unknown dataset {spec!r} (and no such file); known: {known}"
            )
        hint = f"pass registry= or set {REGISTRY_ENV}"
        raise DataError(
            spec, None, None, f"no such data file, and no registry to look the name up in ({hint})"
        )
    dataset = read_file(
        entry.file,
        format=format or entry.format,
        columns=columns if columns is not None else entry.columns,
        image_root=image_root or entry.image_root,
        problem_type=problem_type or entry.problem_type,
        check_images=check_images,
        skip_invalid=skip_invalid,
        limit=limit,
    )
    dataset.template = entry.template
    dataset.split = entry.split
    return dataset
