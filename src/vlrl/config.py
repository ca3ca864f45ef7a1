"""Typed configs: one dataclass per command, loaded from YAML plus dotted `key=value` overrides.

An unknown key is an error that names the valid keys; the resolved config is written into the run
directory. Values in overrides are parsed as YAML scalars (`lr=3e-4`, `freeze_vision=true`, `data=[a,b]`).
Config text is the user's: YAML anchors and aliases and deep nesting are refused (`load_yaml`), floats must be
finite, and each config dataclass checks its own names and ranges (`check_ranges`, `check_names`) when made, so a
bad value is a ConfigError before a command writes or loads anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


MAX_YAML_DEPTH = 64  # nesting levels a config may have (real ones have 3): deeper YAML is refused, not recursed into


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader for user-written config files: refuses anchors and aliases (`&a`, `*a`), with which a few lines
    of YAML expand to a tree of billions of nodes once anything walks it (an alias bomb), and nesting deeper than
    `MAX_YAML_DEPTH` (which would exhaust the recursion limit). A config never needs either."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _refused(event, "YAML anchors and aliases (&name, *name) are not allowed in a config; "
                                  "write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _refused(event, f"nested too deep (more than {MAX_YAML_DEPTH} levels)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _refused(event: Any, message: str) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=message, problem_mark=event.start_mark)


def load_yaml(text: str, source: str) -> Any:
    """Parse user-written YAML (a config file, a `key=value` override, a registry file) without anchors, aliases
    or deep nesting. Raises ConfigError `source:line: problem`; callers in the data layer re-raise it as their own
    error type."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: {err.problem or err.context or 'invalid YAML'}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), load_yaml(raw, f"override {key.strip()}") if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field type (the subset of types configs use)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section, got {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return _finite(value, where)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _finite(value: int | float | str, where: str) -> float:
    """A config's float: finite (nan and inf reach no setting meaningfully: a nan learning rate trains nothing and
    compares false against every bound). A string is parsed, as YAML 1.1 reads `2e-3` (no dot) as one."""
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _onto_default_section(f: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
    """A given section's keys laid over the section's default instance (a parent's default factory), so that
    `trust.judge.timeout=5` keeps the default judge's other keys."""
    if not (isinstance(value, dict) and _is_section(tp) and f.default_factory is not dataclasses.MISSING):
        return value
    return _merge(dataclasses.asdict(f.default_factory()), value)


def build(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a dict; unknown keys and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(values) - set(fields)))  # YAML keys may be numbers, null, ...
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    values = {k: _onto_default_section(fields[k], hints[k], v) for k, v in values.items()}
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (KeyError, ValueError, TypeError) as err:  # a dataclass's own validation (e.g. an unknown name)
        raise ConfigError(f"{where}: {err.args[0] if err.args else err}") from err


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    base: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        loaded = load_yaml(_read_text(p), str(p)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        base = loaded
    where = str(path) if path is not None else "config"
    return build(cls, _merge(base, parse_overrides(overrides or [])), where)


# the ranges `check_ranges` knows, as its messages write them
RANGES: dict[str, Callable[[Any], bool]] = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "> 1": lambda v: v > 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 2**63)": lambda v: 0 <= v < 2**63,
}


def check_ranges(rules: list[tuple[str, Any, str]]) -> None:
    """Raise ValueError naming the first (key, value, range) whose value is outside its range (a `RANGES` key); a
    None value (unset) passes. Configs call it in their own checks, so a bad value stops the run before it loads
    anything, with the key's name."""
    for key, value, rule in rules:
        if value is not None and not RANGES[rule](value):
            raise ValueError(f"{key} must be {rule}, got {value!r}")


def check_names(rules: list[tuple[str, Any, Any]]) -> None:
    """Raise ValueError for the first (key, value, valid values) whose value is not among the valid ones."""
    for key, value, valid in rules:
        if value not in valid:
            raise ValueError(f"{key}: unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def check_out_path(key: str, path: str, kind: str = "dir") -> None:
    """Refuse an output path the run could not write, before it writes anything: empty, an existing file where a
    folder (`kind` dir) goes or a folder where a file goes, or under an existing file."""
    if not path:
        raise ValueError(f"{key} must name a {'folder' if kind == 'dir' else 'file'}")
    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ValueError(f"{key} {path!r} is a file, not a folder")
    if kind == "file" and p.is_dir():
        raise ValueError(f"{key} {path!r} is a folder, not a file")
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{key} {path!r}: {parent} is a file, not a folder")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value that occurs twice out twice: a saved config must load back through `load_yaml`, which
    refuses aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=_NoAliasDumper, sort_keys=False))


# --- describing a config (`vlrl <command> --help`) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One settable key of a config dataclass, as `config_keys` finds it."""

    key: str  # dotted path from the top of the config, e.g. "trust.judge.timeout"
    type: str  # the field's type, module prefixes dropped, e.g. "list[RewardSpec]"
    default: str | None  # the default as YAML would write it; None when the key is required
    help: str  # the field's `# comment` (see `field_comments`); "" when it has none


def field_comments(cls: type) -> dict[str, str]:
    """Each field's description, read from the source of `cls` (and of its dataclass bases): the trailing
    `# comment` on the line that declares the field, continued by the comment-only lines right below it
    whose text starts with two or more spaces after the `#` (`#   continued`). A comment line with one space
    (`# rollout`) is a heading, not a continuation."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_class_comments(klass))
    return out


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source file (a class built at run time)
        return {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    notes: dict[str, list[str]] = {}
    depth, line_start = 0, True
    owner: str | None = None  # the field declared by the current logical line
    last: tuple[str, int] | None = None  # (field, line of its latest comment) that a continuation may extend
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            line_start, owner = True, None
        elif tok.type == tokenize.COMMENT:
            text = tok.string[1:]
            if owner is not None:
                notes.setdefault(owner, []).append(text.strip())
                last = (owner, tok.start[0])
            elif line_start and last and tok.start[0] == last[1] + 1 and text.startswith("  "):
                notes[last[0]].append(text.strip())
                last = (last[0], tok.start[0])
            else:
                last = None
        elif tok.type not in (tokenize.NL, tokenize.ENCODING) and line_start:
            line_start = False
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            is_field = depth == 1 and tok.type == tokenize.NAME and nxt is not None and nxt.string == ":"
            owner = tok.string if is_field else None
            last = None
    return {name: " ".join(parts) for name, parts in notes.items()}


def type_name(tp: Any) -> str:
    """`int`, `str | None`, `list[RewardSpec]`, `dict[str, Any]`: a type as a reader writes it."""
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(tp))


def show_value(value: Any) -> str:
    """A default value as YAML flow style writes it: null, true, [0.9, 0.95], {name: accuracy}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _default_of(f: dataclasses.Field[Any], section: Any) -> Any:
    """The value a key takes when not given: from the enclosing section's default instance when there is one
    (a parent's default factory may fill a field that has no default of its own), else the field's default."""
    if section is not None:
        return getattr(section, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_keys(cls: type, prefix: str = "", section: Any = None) -> list[KeyDoc]:
    """Every settable key of config dataclass `cls`, in declaration order; the fields of a nested dataclass
    section are listed as dotted keys (`trust.judge.timeout`), each with the default a loaded config gets."""
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        default = _default_of(f, section)
        if _is_section(tp):
            out += config_keys(tp, key + ".", None if default is dataclasses.MISSING else default)
            continue
        text = None if default is dataclasses.MISSING else show_value(default)
        out.append(KeyDoc(key, type_name(tp), text, notes.get(f.name, "")))
    return out


def describe_config(cls: type) -> str:
    """The keys of config dataclass `cls`, two lines each: `  key: type = default` (`  key: type  (required)`)
    and the indented description."""
    lines = []
    for doc in config_keys(cls):
        head = f"  {doc.key}: {doc.type}" + ("  (required)" if doc.default is None else f" = {doc.default}")
        lines += [head, f"      {doc.help}".rstrip()]
    return "\n".join(lines)
