"""The run harness SFT, RL and curate share: resume from the newest complete checkpoint, the step loop with its
time budget and progress bar, periodic validation, metric logging (metrics.jsonl), checkpoints (keep-last-k) and
the final save.

    harness = RunHarness(Path(cfg.out), info, schedule_of(cfg))
    start_from, state = harness.resume_point(cfg.model)   # the newest complete checkpoint, else cfg.model
    ...build model, optimizer, scheduler from start_from...
    step, position = harness.restore(state, opt, sched)   # optimizer, scheduler, RNG, step, data position
    step = harness.loop(step, position, step_fn, save=..., validate=..., desc="sft/full", postfix="loss")

`step_fn(step, position) -> (record, rows, position)` runs one optimizer step on global batch `step` (whose
data starts at `position`) and returns its metrics, the rollout rows to log (RL) and the next position.

A run whose steps persist their own results (curate: one step is one batch of items, appended durably to its
result log, and a re-run skips what is there) has no checkpoint to write or restore: it passes `save=None`,
starts the clock with `start_clock()` (its budget counts this invocation only) and sets `min_steps=1` so every
invocation makes progress. SFT and RL keep `min_steps=0` and a clock restored from the checkpoint, so their
budget covers the whole run and a run resumed out of time takes no step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlrl.train import checkpoint as ckpt
from vlrl.train.dist import DistInfo, barrier
from vlrl.train.logging import MetricsLogger

StepFn = Callable[[int, int], tuple[dict[str, Any], list[dict[str, Any]], int]]


@dataclass(frozen=True)
class Schedule:
    """When a run stops, validates, logs and saves (the fields of the same names in SFTConfig and RLConfig;
    curate builds its own). `min_steps`: steps each call of `RunHarness.loop` takes before the time budget can
    stop it."""

    max_steps: int
    max_seconds: float | None
    save_every: int
    keep_checkpoints: int
    log_every: int
    eval_every: int
    min_steps: int = 0


def schedule_of(cfg: Any) -> Schedule:
    """The `Schedule` of a config that has its fields (SFTConfig, RLConfig)."""
    return Schedule(cfg.max_steps, cfg.max_seconds, cfg.save_every, cfg.keep_checkpoints, cfg.log_every,
                    cfg.eval_every)  # fmt: skip


class RunHarness:
    """Resume, loop, validate, log and save one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, info: DistInfo, schedule: Schedule, *, row_log: bool = False) -> None:
        self.run_dir = run_dir
        self.info = info
        self.schedule = schedule
        self.metrics = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main)
        self.rows = MetricsLogger(run_dir / "samples.jsonl", enabled=info.is_main) if row_log else None
        self.t0 = time.perf_counter()
        self.start_from: str | None = None

    def resume_point(self, model: str) -> tuple[str, dict[str, Any] | None]:
        """The newest complete checkpoint and its trainer state, or (`model`, None) for a fresh run."""
        last = ckpt.latest_checkpoint(self.run_dir)
        self.start_from = model if last is None else str(last)
        return (model, None) if last is None else (str(last), ckpt.load_state(last))

    def restore(self, state: dict[str, Any] | None, opt: Any, sched: Any) -> tuple[int, int]:
        """Load optimizer, scheduler and RNG states; (step, data position) to continue from; start the clock."""
        step, position, elapsed = 0, 0, 0.0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            ckpt.set_rng_state(state["rng"])
            step, position, elapsed = state["step"], state["position"], state.get("elapsed", 0.0)
            for log in (self.metrics, self.rows):
                if log is not None:
                    log.truncate_after(step)  # those steps run again
            if self.info.is_main:
                print(f"resumed from {self.start_from} at step {step}")
        self.start_clock(elapsed)
        return step, position

    def start_clock(self, elapsed: float = 0.0) -> None:
        """Start the time budget's clock as if `elapsed` seconds had already passed."""
        self.t0 = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.schedule.max_seconds is not None and self.elapsed() >= self.schedule.max_seconds

    def save(self, step: int, position: int, model: Any, processor: Any, opt: Any, sched: Any) -> None:
        """Checkpoint `step` (rank 0 writes; every rank waits): weights, optimizer, scheduler, RNG, position."""
        barrier()
        if self.info.is_main:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
                     "step": step, "position": position, "elapsed": self.elapsed()}  # fmt: skip
            ckpt.save_checkpoint(self.run_dir, step, model, processor, state, keep=self.schedule.keep_checkpoints)
        barrier()

    def _due(self, step: int, every: int) -> bool:
        return every > 0 and step % every == 0 or step == self.schedule.max_steps

    def loop(
        self,
        step: int,
        position: int,
        step_fn: StepFn,
        *,
        save: Callable[[int, int], None] | None,
        validate: Callable[[], dict[str, float]] | None,
        desc: str,
        postfix: str,
    ) -> int:
        """Run steps until `max_steps` or the time budget (checked before each step once `min_steps` steps of this
        call are done); returns the last step. Ends on a checkpoint unless `save` is None (no checkpoint)."""
        s = self.schedule
        first = step
        bar = tqdm(total=s.max_steps, initial=step, desc=desc, disable=not self.info.is_main)
        try:
            while step < s.max_steps and (step - first < s.min_steps or not self.out_of_time()):
                record, rows, position = step_fn(step, position)
                step += 1
                bar.update(1)
                record = {"step": step, **record, "elapsed_s": self.elapsed()}
                if validate is not None and s.eval_every > 0 and self._due(step, s.eval_every):
                    t = time.perf_counter()
                    record.update(validate())
                    record["time/eval"] = time.perf_counter() - t
                if self._due(step, s.log_every) or "val_accuracy" in record:
                    self.metrics.log(record)
                    if self.rows is not None:
                        for row in rows:
                            self.rows.log(row)
                    bar.set_postfix({postfix: f"{record[postfix]:.3f}"})
                if save is not None and (self._due(step, s.save_every) or self.out_of_time()):
                    save(step, position)
        finally:
            bar.close()
        if save is None:
            return step
        last = ckpt.latest_checkpoint(self.run_dir)
        if last is None or last.name != f"step-{step}":
            save(step, position)
        return step
