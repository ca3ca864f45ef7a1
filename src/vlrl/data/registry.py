"""A dataset registry file (YAML or JSON), in the spirit of SophiaVL-R1's / LLaMA-Factory's dataset_info.json:

    counting:                      # the name load_dataset() takes
      file: synth/counting/train.jsonl   # relative to the registry file's folder; a folder of shards or a glob too
      format: vlmr1                # optional; detected from the first record otherwise
      image_root: synth/counting   # optional; default: the data file's folder
      template: answer             # optional; the prompt template training / eval apply
      split: train                 # optional: the split read from a folder holding several (and a label)
      allow_outside_image_root: false  # optional: relative image paths may climb out of image_root (../x.png)
      max_text_chars: 100000       # optional: the longest string a record may hold (`vlrl.data.screen`)
    my_table:
      file: tables/q.parquet
      columns: {question: q, answer: a, image: img_path}
      problem_type: numerical      # every row (or a `problem_type` column in `columns`)

SophiaVL-R1's own `dataset_info.json` is read as it is written: an entry with `file_path` (a file or a folder
of parquet shards), `image_base_path` (what image paths are relative to; "" = the data file's folder) and
`columns` mapping source column -> role (prompt, answer, images), e.g.

    {"demo": {"file_path": "demo.json", "image_base_path": "datasets",
              "columns": {"problem": "prompt", "solution": "answer", "path": "images"}}}

Its rows are read by format `sophiavl` (`vlrl.data.frameworks`). SophiaVL resolves these paths against its
working directory (its repository root): a path that does not exist beside the registry file but does exist
from the current directory is taken from there.

`load_dataset(spec)` takes a registry name or a path to data (a file, a folder of shards, a glob,
a `save_to_disk` folder); `NAME@SPLIT` / `PATH@SPLIT` picks a split, as EasyR1 and SophiaVL-R1 write it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vlrl.config import ConfigError, load_yaml
from vlrl.data.columns import ColumnMap
from vlrl.data.errors import DataError
from vlrl.data.formats import FORMATS, Dataset, read_file
from vlrl.data.frameworks import ROLES
from vlrl.data.screen import TextLimits, record_problem
from vlrl.data.sources import is_dataset_path, split_spec
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
    rename: dict[str, str] | None = None  # SophiaVL-R1's `columns`: source column -> role
    allow_outside_image_root: bool | None = None  # relative image paths may climb out of image_root (`../x.png`)
    max_text_chars: int | None = None  # longest string a record may hold (default `screen.DEFAULT_MAX_TEXT_CHARS`)


_ENTRY_KEYS = tuple(f.name for f in fields(RegistryEntry) if f.name not in ("name", "rename"))
_SOPHIAVL_KEYS = ("file_path", "image_base_path", "columns", "format", "problem_type", "template", "split",
                  "allow_outside_image_root", "max_text_chars")


def _parse_file(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, None, None, "registry file not found")
    try:  # no anchors or aliases (an alias bomb expands a few lines into billions of nodes), no deep nesting
        return load_yaml(path.read_text(encoding="utf-8"), str(path))  # JSON is YAML too
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"invalid registry: not UTF-8 ({exc.reason})") from None
    except ConfigError as exc:
        where, _, problem = str(exc).partition(": ")
        line = where.rpartition(":")[2]
        raise DataError(path, int(line) if line.isdigit() else None, None, f"invalid registry: {problem}") from None


def _check_entry(path: Path, name: str, raw: Any) -> None:
    """Unknown keys, a missing file, an unknown format or template: a `DataError` naming the entry's field."""
    if not isinstance(raw, dict):
        raise DataError(path, None, name, f"an entry must be a mapping with at least 'file', got {raw!r}")
    valid = _SOPHIAVL_KEYS if "file_path" in raw else _ENTRY_KEYS
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise DataError(path, None, name, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    file_key = "file_path" if "file_path" in raw else "file"
    if not isinstance(raw.get(file_key), str) or not raw[file_key]:
        raise DataError(path, None, f"{name}.{file_key}", "missing required field (the data file path)")
    if raw.get("format") is not None and raw["format"] not in FORMATS:
        raise DataError(
            path, None, f"{name}.format", f"unknown format {raw['format']!r}; valid: {', '.join(FORMATS)}"
        )
    if raw.get("template") is not None and (not isinstance(raw["template"], str) or raw["template"] not in TEMPLATES):
        raise DataError(
            path,
            None,
            f"{name}.template",
            f"unknown template {raw['template']!r}; valid: {', '.join(TEMPLATES)}",
        )
    if not isinstance(raw.get("allow_outside_image_root", False), bool):
        raise DataError(path, None, f"{name}.allow_outside_image_root", "must be true or false")
    chars = raw.get("max_text_chars")
    if chars is not None and (isinstance(chars, bool) or not isinstance(chars, int) or chars < 1):
        raise DataError(path, None, f"{name}.max_text_chars", f"must be a positive integer, got {chars!r}")
    columns = raw.get("columns")
    if columns is not None and not isinstance(columns, dict):
        raise DataError(path, None, f"{name}.columns", "must be a mapping of role -> column name")


def _rename(path: Path, name: str, columns: dict[str, Any]) -> dict[str, str]:
    """SophiaVL-R1's `columns` (source column -> role), each role of ROLES named once."""
    out = {str(k): str(v) for k, v in columns.items()}
    for role in ROLES:
        sources = [k for k, v in out.items() if v == role]
        if len(sources) > 1:
            raise DataError(path, None, f"{name}.columns", f"role {role!r} is given by {', '.join(sources)}")
    return out


def _entry(path: Path, name: str, raw: Any) -> RegistryEntry:
    _check_entry(path, name, raw)
    sophiavl = "file_path" in raw
    base = path.parent

    def resolve(p: str | None) -> str | None:
        if p is None or (sophiavl and p == ""):
            return None
        full = os.path.normpath(os.path.join(base, os.path.expanduser(str(p))))
        if sophiavl and not is_dataset_path(full) and is_dataset_path(str(p)):
            return os.path.abspath(os.path.expanduser(str(p)))  # SophiaVL's paths are relative to its working dir
        return full

    columns = raw.get("columns")
    if sophiavl:
        rename = None if columns is None else _rename(path, name, columns)
        return RegistryEntry(
            name=name,
            file=str(resolve(raw["file_path"])),
            format=raw.get("format") or ("sophiavl" if rename is not None else None),
            image_root=resolve(raw.get("image_base_path")),
            problem_type=raw.get("problem_type"),
            template=raw.get("template"),
            split=None if raw.get("split") is None else str(raw["split"]),
            rename=rename,
            allow_outside_image_root=raw.get("allow_outside_image_root"),
            max_text_chars=raw.get("max_text_chars"),
        )
    return RegistryEntry(
        name=name,
        file=str(resolve(raw["file"])),
        format=raw.get("format"),
        image_root=resolve(raw.get("image_root")),
        columns=None if columns is None else ColumnMap.from_dict(columns, path=f"{path} ({name})"),
        problem_type=raw.get("problem_type"),
        template=raw.get("template"),
        split=None if raw.get("split") is None else str(raw["split"]),
        allow_outside_image_root=raw.get("allow_outside_image_root"),
        max_text_chars=raw.get("max_text_chars"),
    )


def load_registry(path: str | Path) -> dict[str, RegistryEntry]:
    """Every entry of a registry file, validated (unknown keys, formats and templates are errors)."""
    p = Path(path)
    data = _parse_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(p, None, None, f"a registry is a mapping of name -> entry, got {type(data).__name__}")
    problem = record_problem(data, TextLimits())  # lone surrogates (YAML decodes "\ud800"), huge text, depth
    if problem is not None:
        raise DataError(p, None, *problem)
    return {str(name): _entry(p, str(name), raw) for name, raw in data.items()}


def default_registry() -> str | None:
    """The registry named by $VLRL_DATA_REGISTRY, if set."""
    return os.environ.get(REGISTRY_ENV) or None


def resolve_dataset(
    spec: str,
    *,
    registry: str | None = None,
    **overrides: Any,
) -> tuple[str, dict[str, Any], RegistryEntry | None]:
    """(path, `read_file` keyword arguments, registry entry or None) of `spec`, without reading any record.

    `overrides` are `read_file`'s keywords (format, columns, image_root, problem_type, split, ...); those given
    (not None) win over the registry entry's."""
    registry = registry or default_registry()
    entries = load_registry(registry) if registry else {}
    name, name_split = split_spec(spec) if spec not in entries else (spec, None)
    entry = entries.get(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if entry is None:
        if is_dataset_path(spec):
            return spec, given, None
        if registry:
            known = ", ".join(sorted(entries)) or "(none)"
            raise DataError(
                registry, None, None, f"unknown dataset {spec!r} (and no such file); known: {known}"
            )
        hint = f"pass registry= or set {REGISTRY_ENV}"
        raise DataError(
            spec, None, None, f"no such data file, and no registry to look the name up in ({hint})"
        )
    from_entry = {"format": entry.format, "columns": entry.columns, "image_root": entry.image_root,
                  "problem_type": entry.problem_type, "split": name_split or entry.split, "rename": entry.rename,
                  "allow_outside_image_root": entry.allow_outside_image_root,
                  "limits": None if entry.max_text_chars is None else TextLimits(max_text_chars=entry.max_text_chars)}
    kwargs = {k: v for k, v in from_entry.items() if v is not None} | given
    return entry.file, kwargs, entry


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
    split: str | None = None,
) -> Dataset:
    """Load `spec`: a name in the registry (`registry`, else $VLRL_DATA_REGISTRY) or a path to data (a file, a
    folder of shards, a glob, a `save_to_disk` folder), either with an optional `@SPLIT`.

    Keyword arguments given here override the registry entry's. A name that is neither registered nor existing
    data is a `DataError` listing the registered names."""
    path, kwargs, entry = resolve_dataset(spec, registry=registry, image_root=image_root, format=format,
                                          columns=columns, problem_type=problem_type, split=split)
    dataset = read_file(path, check_images=check_images, skip_invalid=skip_invalid, limit=limit, **kwargs)
    if entry is not None:
        dataset.template = entry.template
        dataset.split = kwargs.get("split")
    return dataset
