"""Owning a run directory (`out`) that SFT, RL and curate write: one run at a time, and one config for its life.

Lock: `hold_run_dir` takes an exclusive `fcntl.flock` on `out/.lock` (rank 0 under torchrun; the other ranks learn
its outcome) and writes the holder's pid, host, start time and command line into it. A second run into the same
`out` is refused with a ConfigError naming the holder, before it loads a model or writes anything. The kernel
drops the lock when its process ends, however it ends (SIGKILL included), so a dead run never leaves a stale lock;
the file stays (deleting a lock file races with a process that has just opened it).

Config: `check_config_changes` compares the config a run starts with against the run directory's `config.yaml`
(what its checkpoints were trained with). Keys that `free` accepts (a longer run, other logging or validation
cadence, trackers, threads) may change; any other change (model, data, algorithm, rewards, shapes, dtype, seed,
...) is refused with each key's old and new value unless the run allows it explicitly. A key the saved config
lacks (a run folder written before the key existed) is unchanged when the run gives it its default. `write_config`
then writes the new `config.yaml`, after appending what changed (old and new values, and which changes were
forced) to `config.history.jsonl`: nothing of the original is lost.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from vlrl.config import ConfigError, load_yaml, save_config, to_dict
from vlrl.train.dist import DistInfo, barrier, broadcast_object

LOCK_FILE = ".lock"
HISTORY_FILE = "config.history.jsonl"
RESUME_CHANGES = ("refuse", "allow")  # the values of the configs' `resume_changes` key

# keys that only extend or observe a run, or say how it is spread over ranks or saved (checkpoints of either
# format resume at any world size and `parallel`, whatever `checkpoint_format` says now): a resume may change
# them (a dotted prefix covers a whole section)
SFT_FREE_KEYS = ("out", "max_steps", "max_seconds", "save_every", "keep_checkpoints", "log_every", "report_to",
                 "val_data", "val_limit", "eval_every", "threads", "cache_encoded", "resume_changes",
                 "nonfinite_limit", "dist_timeout", "parallel", "cpu_offload", "checkpoint_format")  # fmt: skip
# The vLLM worker's place, resources and patience may change on resume; what it samples may not. So
# `rollout.engine` (hf and vllm draw from different random streams: the same seeds give other completions),
# `rollout.vllm.dtype` (the precision of the logits tokens are drawn from) and `rollout.vllm.max_model_len` (it can
# end completions early) are not free: a change is refused or, when allowed, recorded.
RL_VLLM_FREE_KEYS = tuple(f"rollout.vllm.{k}" for k in ("url", "python", "gpu_memory_utilization", "max_images",
                                                        "startup_timeout", "request_timeout", "retries", "token_env"))
RL_FREE_KEYS = ("out", "max_steps", "max_seconds", "threads", "gradient_checkpointing", "logprob_chunk_tokens",
                "logging", "validation", "resume_changes", "nonfinite_limit", "dist_timeout", "parallel", "cpu_offload",
                "checkpoint_format", *RL_VLLM_FREE_KEYS)  # fmt: skip


class RunLock:
    """The held lock of a run directory (a no-op on ranks other than 0); released by `release`, by leaving its
    `with` block, or by the end of the process."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def holder_record(command: str) -> dict[str, Any]:
    """What a lock file says about its holder."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}


def describe_holder(text: str) -> str:
    """A lock file's holder as one phrase; its content is whatever the holder wrote, so anything unexpected is
    reported as unknown rather than trusted."""
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        return "another process (its details are not written yet)"
    return (f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}: "
            f"{str(rec.get('command', '?'))[:500]}")  # fmt: skip


def lock_run_dir(out: Path, command: str | None = None) -> RunLock:
    """Take `out`'s lock (creating `out`), or raise a ConfigError naming the process that holds it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        os.close(fd)
        raise ConfigError(f"{out} is in use by another run ({describe_holder(text)}); wait for it to end, or use "
                          "another out directory") from None  # fmt: skip
    line = json.dumps(holder_record(shlex.join(sys.argv) if command is None else command)) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)
    return RunLock(fd)


def hold_run_dir(out: Path, info: DistInfo, command: str | None = None) -> RunLock:
    """`lock_run_dir` on rank 0; every rank raises the same ConfigError when it is refused."""
    lock, refused = RunLock(None), None
    if info.is_main:
        try:
            lock = lock_run_dir(out, command)
        except ConfigError as err:
            refused = str(err)
    shared = broadcast_object(refused)
    if shared is not None:
        raise ConfigError(str(shared))
    return lock


# --- the run's config --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str  # dotted, e.g. "rollout.group_size"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


_ABSENT = "<absent>"


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                   defaults: dict[str, Any] | None = None) -> list[Change]:
    """Every key whose value differs, dotted into the sections (and mappings) both sides have; lists (data,
    rewards) compare whole; a key only one side has shows as `<absent>` on the other. With `defaults` (the
    config's default values, `config_defaults`), a key the old side lacks is unchanged where the new side holds
    its default, and a section it lacks compares key by key with the defaults: a run folder written before a key
    existed resumes, unless the key is now set to something else."""
    defaults = defaults or {}
    out: list[Change] = []
    for k in sorted(set(old) | set(new), key=str):
        a, b, d = old.get(k, _ABSENT), new.get(k, _ABSENT), defaults.get(k, _ABSENT)
        if k not in old and isinstance(b, dict) and isinstance(d, dict):
            a = {}  # a section added since the old side was written: each of its keys against its default
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.", d if isinstance(d, dict) else None)
        elif a != b and not (k not in old and k in defaults and b == d):
            out.append(Change(f"{prefix}{k}", a, b))
    return out


def config_defaults(cls: type) -> dict[str, Any]:
    """The values config dataclass `cls` gives the keys a config leaves out (keys without a default are left
    out), nested sections as mappings, as config.yaml holds them: what a key that an older config.yaml lacks
    stands for when the run resumes."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = _plain(value)
    return yaml.safe_load(yaml.safe_dump(out, sort_keys=False)) or {}


def _plain(value: Any) -> Any:
    """`value` with every dataclass in it (a section, a list's `RewardSpec`s) turned into a mapping."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def free_keys(names: Collection[str]) -> Callable[[str], bool]:
    """A predicate: the key is one of `names` or inside a section one of them names."""
    return lambda key: any(key == n or key.startswith(n + ".") for n in names)


def read_saved_config(out: Path) -> dict[str, Any] | None:
    """`out/config.yaml` as a mapping, or None when there is none."""
    path = out / "config.yaml"
    if not path.exists():
        return None
    saved = load_yaml(path.read_text(encoding="utf-8", errors="replace"), str(path))  # a folder may be anyone's
    if saved is not None and not isinstance(saved, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return saved or {}


def as_saved(cfg: Any) -> dict[str, Any]:
    """`cfg` as config.yaml holds it once written and read back (tuples as lists), to compare like with like."""
    return yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)) or {}


def check_config_changes(out: Path, cfg: Any, free: Callable[[str], bool], *, enforce: bool, allow: bool,
                         what: str, hint: str) -> tuple[list[Change], list[Change]]:
    """Compare `cfg` with `out/config.yaml`: (all changes, those `free` does not accept). With `enforce` (there is
    trained state the saved config describes) and not `allow`, a change outside `free` is a ConfigError:
    `{what} (key: old -> new; ...); {hint}`."""
    saved = read_saved_config(out)
    if saved is None:
        return [], []
    defaults = config_defaults(type(cfg)) if dataclasses.is_dataclass(cfg) else None
    changes = config_changes(saved, as_saved(cfg), defaults=defaults)
    refused = [c for c in changes if not free(c.key)]
    if refused and enforce and not allow:
        raise ConfigError(f"{what} ({'; '.join(map(str, refused))}); {hint}")
    return changes, refused if enforce else []


def write_config(out: Path, cfg: Any, changes: list[Change], forced: list[Change]) -> None:
    """Append what changed to config.history.jsonl (before config.yaml changes), then write config.yaml."""
    if changes:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        line = {"time": when, "changes": {c.key: {"old": c.old, "new": c.new} for c in changes},
                "forced": [c.key for c in forced]}  # fmt: skip
        with (out / HISTORY_FILE).open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
    save_config(cfg, out / "config.yaml")


def record_run_config(out: Path, cfg: Any, info: DistInfo, free_names: Collection[str], *, resuming: bool) -> None:
    """SFT's and RL's config step: refuse a resume with other settings unless `cfg.resume_changes` is "allow"
    (every rank decides alike), then (rank 0) record the changes and write config.yaml."""
    mode = getattr(cfg, "resume_changes", "refuse")
    if mode not in RESUME_CHANGES:
        raise ConfigError(f"resume_changes must be one of {', '.join(RESUME_CHANGES)}, got {mode!r}")
    changes, forced = check_config_changes(
        out, cfg, free_keys(free_names), enforce=resuming, allow=mode == "allow",
        what=f"{out} holds checkpoints trained with other settings",
        hint="resume with the same settings, train into another out directory, or set resume_changes=allow to "
             f"resume anyway (the changes are recorded in {HISTORY_FILE})")  # fmt: skip
    barrier()  # every rank has read the saved config before rank 0 replaces it
    if info.is_main:
        write_config(out, cfg, changes, forced)
