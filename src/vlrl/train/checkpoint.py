"""Checkpoints: `checkpoints/step-N/` holds an HF model folder that transformers loads directly, plus
`trainer_state.pt` (optimizer, scheduler, RNG states, step, data position) for exact resume.

Two formats (`checkpoint_format`). `full`: rank 0 gathers the whole weights and optimizer state and writes them as
above (eval, serve and the demo load the folder as it is). `sharded`: every rank writes its own part of the model
and optimizer state with torch.distributed.checkpoint into `step-N/sharded/` (no rank holds the whole state), and
rank 0 the HF config, the processor and `trainer_state.pt` without weights or optimizer, marked
`checkpoint_format: sharded`; resume reads it at any world size and under any `parallel`, and `vlrl export` turns
it into an HF folder. All ranks write into one folder: a run on several nodes needs its run directory on a
filesystem they share. The RNG states are rank 0's in both formats (every rank restores those).

A checkpoint is written to `step-N.tmp/` and renamed when complete, so a crash mid-write leaves the
previous checkpoint as the newest complete one; the next save removes any `.tmp` folder left behind. A write that
fails (a full or read-only disk) stops the run with `CheckpointWriteError`, naming the checkpoint resume will take.

The trainer state holds only tensors and plain values (dicts, lists, ints, floats, str, None), and is read with
`torch.load(weights_only=True)`: a checkpoint folder from someone else cannot run code when a run resumes from
it (a pickle that names any other object is refused). The Python and numpy RNG states, which are tuples and arrays,
are stored as plain lists and tensors for that reason (`rng_state` / `set_rng_state`).
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlrl.config import ConfigError
from vlrl.models.loading import SHARDED_STATE
from vlrl.train.dist import barrier

STATE_FILE = "trainer_state.pt"
FORMATS = ("full", "sharded")  # the values of the configs' `checkpoint_format`
FORMAT_KEY = "checkpoint_format"  # the trainer state's marker of a sharded checkpoint (absent: full)
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, ...): the run stops rather than go on unsaved."""


def rng_state() -> dict[str, Any]:
    """The Python, numpy and torch RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state()}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, model: Any, processor: Any, state: dict[str, Any], keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` (rank 0 only), then prune all but the newest `keep`. `weights`: the model's state
    dict when the model itself holds only a shard of it (FSDP2)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    remove_partial(root)
    try:
        tmp.mkdir(parents=True)
        if weights is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # free what it took; if this fails too, the next save removes it
        raise _write_error(run_dir, final, err) from err
    _prune(run_dir, keep)
    return final


def save_sharded_checkpoint(run_dir: Path, step: int, write_shards: Callable[[Path], None], model: Any,
                            processor: Any, state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Write sharded checkpoint `step`, then prune all but the newest `keep` (a collective: every rank calls it).
    `write_shards(folder)` writes this rank's files of the model and optimizer state
    (`vlrl.train.parallel.save_sharded`) and returns once every rank's are written; rank 0 then adds `model`'s
    config, the processor and `state`, and renames the folder complete. Every rank writes into the same
    `step-N.tmp`, so on several nodes the run directory must be on a filesystem they share."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        if is_main:
            remove_partial(root)
            tmp.mkdir(parents=True)
        barrier()  # the folder exists before any rank writes into it
        write_shards(tmp / SHARDED_STATE)
        if is_main:  # every rank's shards are written (DCP's save ends with rank 0's metadata after all of them)
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            torch.save({**state, FORMAT_KEY: "sharded"}, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except (OSError, CheckpointException) as err:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, final, err) from err
    if is_main:
        _prune(run_dir, keep)
    return final


def is_sharded(state: dict[str, Any]) -> bool:
    """Whether a trainer state (`load_state`) is a sharded checkpoint's: its weights are in `sharded/`."""
    return state.get(FORMAT_KEY) == "sharded"


def _write_error(run_dir: Path, final: Path, err: BaseException) -> CheckpointWriteError:
    last = latest_checkpoint(run_dir)
    resume = f"re-running resumes from {last}" if last is not None else "no checkpoint was written yet"
    return CheckpointWriteError(f"could not write checkpoint {final}: {err}; the run stopped ({resume})")


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def remove_partial(root: Path) -> None:
    """Delete the `step-N.tmp` folders of checkpoint writes that did not finish (killed, disk full): the run
    directory's lock (`vlrl.train.rundir`) makes them this run's own leftovers, never another run's write."""
    if root.exists():
        for p in root.glob("step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `ckpt`, read without running code (`weights_only=True`): a file that
    needs more than tensors and plain values (someone else's, or one written before vlrl stored its RNG states
    as tensors) is refused with a ConfigError."""
    path = ckpt / STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: refused to load: it holds objects other than tensors and plain values, which "
                          f"could run code ({reason}); resume only from checkpoints this version of vlrl wrote, "
                          "or start a new out directory") from None  # fmt: skip
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: refused to load: not a trainer state (a {type(state).__name__})")
    return state
