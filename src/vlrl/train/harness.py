"""The run harness SFT, RL and curate share: resume from the newest complete checkpoint, the step loop with its
time budget and progress bar, periodic validation, metric logging (metrics.jsonl), checkpoints (keep-last-k) and
the final save.

    harness = RunHarness(Path(cfg.out), info, schedule_of(cfg))
    start_from, state = harness.resume_point(cfg.model)   # the newest complete checkpoint, else cfg.model
    ...build model, optimizer, scheduler from start_from...
    step, position = harness.restore(state, opt, sched, root)   # optimizer, scheduler, RNG, step, data position

A sharded checkpoint (`Schedule.checkpoint_format`, `vlrl.train.checkpoint`) holds no HF weights: `resume_point`
gives the run's start model to build from, and `restore` loads the checkpoint's weights and optimizer state into
the wrapped model (`root`) at whatever world size and `parallel` the resumed run has.
    step = harness.loop(step, position, step_fn, save=..., validate=..., desc="sft/full", postfix="loss")

`step_fn(step, position) -> (record, rows, position)` runs one optimizer step on global batch `step` (whose
data starts at `position`) and returns its metrics, the rollout rows to log (RL) and the next position.

A run whose steps persist their own results (curate: one step is one batch of items, appended durably to its
result log, and a re-run skips what is there) has no checkpoint to write or restore: it passes `save=None`,
starts the clock with `start_clock()` (its budget counts this invocation only) and sets `min_steps=1` so every
invocation makes progress. SFT and RL keep `min_steps=0` and a clock restored from the checkpoint, so their
budget covers the whole run and a run resumed out of time takes no step.

A step function that reports `skipped_nonfinite` (updates it skipped for a loss or gradient norm that is not
finite) gets it counted (`NonFiniteCount`): the metrics line says how many since the previous line and in all, and
the run stops with `NonFiniteError` after `Schedule.nonfinite_limit` such steps in a row.

Each logged step goes to metrics.jsonl (and its rows to samples.jsonl) and, on rank 0, to the experiment trackers
the run names (`report_to`, `vlrl.train.trackers`: the same scalars, names and steps, the rows as a table; the
resolved `config` when the loop starts), and prints one progress line (the `progress` fields present in the
record, then seconds per step over the steps since the previous line) above the progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlrl.config import ConfigError, to_dict
from vlrl.models.lora import is_adapters
from vlrl.train import checkpoint as ckpt
from vlrl.train.dist import DistInfo, barrier
from vlrl.train.logging import MetricsLogger, scalars_of
from vlrl.train.parallel import (
    load_optimizer_state,
    load_sharded,
    model_state,
    optimizer_state,
    save_sharded,
    trainable_state,
)
from vlrl.train.trackers import Trackers

StepFn = Callable[[int, int], tuple[dict[str, Any], list[dict[str, Any]], int]]


class NonFiniteError(RuntimeError):
    """`nonfinite_limit` steps in a row had a loss or gradient norm that is not finite: the run has diverged."""


@dataclass
class NonFiniteCount:
    """Steps whose loss or gradient norm was not finite. The step function skips such an update (no optimizer
    step, the weights unchanged) and reports how many it skipped as `skipped_nonfinite`; this turns that into the
    logged `skipped_nonfinite` (skipped since the previous metrics line) and `skipped_nonfinite_total`, and stops
    the run after `limit` such steps in a row (0: never), since a diverged run would otherwise spin on unchanged
    weights until its budget ends. Saved in each checkpoint, so a resumed run counts on."""

    limit: int
    total: int = 0
    in_a_row: int = 0
    unlogged: int = 0

    def count(self, record: dict[str, Any]) -> None:
        """Fold a step's `skipped_nonfinite` into the counts and the record (a record without it is left alone)."""
        if "skipped_nonfinite" not in record:
            return
        skipped = int(record["skipped_nonfinite"])
        self.total += skipped
        self.unlogged += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        record["skipped_nonfinite"], record["skipped_nonfinite_total"] = self.unlogged, self.total

    def check(self, step: int) -> None:
        if self.limit > 0 and self.in_a_row >= self.limit:
            k = self.in_a_row
            raise NonFiniteError(
                f"steps {step - k + 1}-{step}: the loss or gradient norm was not finite {k} steps in a row "
                f"(nonfinite_limit={self.limit}); each was skipped, so the weights are those of step {step - k}. "
                "Lower the learning rate, check the data, or resume from an earlier checkpoint")  # fmt: skip

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row, "unlogged": self.unlogged}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row, self.unlogged = state["total"], state["in_a_row"], state["unlogged"]


# the progress line's fields of each command: (metrics key, label); a key absent from a record is left out (kl
# without a KL term, val_accuracy off evaluation steps)
RL_PROGRESS = (("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("kl", "kl"),
               ("completion/len_mean", "length"), ("val_accuracy", "val_accuracy"))
SFT_PROGRESS = (("loss", "loss"), ("lr", "lr"), ("val_accuracy", "val_accuracy"))


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
    nonfinite_limit: int = 0  # stop after this many steps in a row skipped for a non-finite loss (0: never)
    checkpoint_format: str = "full"  # how checkpoints are written (`vlrl.train.checkpoint.FORMATS`)


def schedule_of(cfg: Any) -> Schedule:
    """The `Schedule` of a config that has its fields (SFTConfig)."""
    return Schedule(cfg.max_steps, cfg.max_seconds, cfg.save_every, cfg.keep_checkpoints, cfg.log_every,
                    cfg.eval_every, nonfinite_limit=cfg.nonfinite_limit,
                    checkpoint_format=format_of(cfg.checkpoint_format, cfg.lora.enabled))  # fmt: skip


def format_of(checkpoint_format: str, lora: bool) -> str:
    """The format a run's checkpoints are written in: LoRA runs save their adapters whole (they are small), so
    `sharded` writes the full format under LoRA."""
    return "full" if lora else checkpoint_format


def steps_in_budget(max_steps: int, step: int, steps_done: int, seconds_done: float, seconds_left: float) -> int:
    """The step a time-bounded run will end on at its pace so far (`steps_done` steps in `seconds_done` s), capped
    by `max_steps`: the progress bar's total, so that its percentage and ETA show whichever bound comes first
    (a run given a large max_steps and a time budget shows the time left, not the steps)."""
    if steps_done <= 0 or seconds_done <= 0:
        return max_steps
    more = int(max(0.0, seconds_left) * steps_done / seconds_done)
    return min(max_steps, step + more)


class RunHarness:
    """Resume, loop, validate, log and save one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, info: DistInfo, schedule: Schedule, *, row_log: bool = False,
                 report_to: Sequence[str] = (), config: Any = None, progress: Sequence[tuple[str, str]] = ()
                 ) -> None:  # fmt: skip
        """`report_to`: the trackers (an unknown name or a missing library raises here, before the run loads
        anything); `config`: the run's config dataclass, sent to them; `progress`: the progress line's fields
        (`RL_PROGRESS`, `SFT_PROGRESS`; none: no line)."""
        self.run_dir = run_dir
        self.info = info
        self.schedule = schedule
        self.trackers = Trackers(list(report_to), run_dir, enabled=info.is_main)
        self.config = config
        self.progress = tuple(progress)
        self.metrics = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main)
        self.rows = MetricsLogger(run_dir / "samples.jsonl", enabled=info.is_main) if row_log else None
        if schedule.nonfinite_limit < 0:
            raise ConfigError(f"nonfinite_limit must be >= 0 (0: never stop), got {schedule.nonfinite_limit}")
        if schedule.checkpoint_format not in ckpt.FORMATS:
            raise ConfigError(f"checkpoint_format {schedule.checkpoint_format!r}; valid: {', '.join(ckpt.FORMATS)}")
        self.nonfinite = NonFiniteCount(schedule.nonfinite_limit)
        self.t0 = time.perf_counter()
        self._line_clock = (self.t0, 0)  # (time, step) of the previous progress line, or of the loop's start
        self.start_from: str | None = None
        self._sharded_from: Path | None = None  # the sharded checkpoint `restore` loads the weights of
        self.restored_weights = False  # `restore` loaded weights into the model (after whatever used the start's)

    def resume_point(self, model: str) -> tuple[str, dict[str, Any] | None]:
        """The newest complete checkpoint and its trainer state, or (`model`, None) for a fresh run. A sharded
        checkpoint comes back as (`model`, its state): the run builds from its start model, and `restore` loads
        the checkpoint's weights into it once wrapped."""
        last = ckpt.latest_checkpoint(self.run_dir)
        self.start_from = model if last is None else str(last)
        if last is None:
            return model, None
        state = ckpt.load_state(last)
        if ckpt.is_sharded(state):
            self._sharded_from = last
            return model, state
        return str(last), state

    def restore(self, state: dict[str, Any] | None, opt: Any, sched: Any, root: Any = None) -> tuple[int, int]:
        """Load optimizer, scheduler and RNG states; (step, data position) to continue from; start the clock.
        `root`: the wrapped model (`vlrl.train.parallel`), which an FSDP2 optimizer state is sharded over; from a
        sharded checkpoint it gets the weights too (a collective then: every rank calls it)."""
        step, position, elapsed = 0, 0, 0.0
        if state is not None and self._sharded_from is not None:
            if root is None:
                raise ValueError("restoring a sharded checkpoint needs the wrapped model (root)")
            load_sharded(root, opt, self._sharded_from / ckpt.SHARDED_STATE)
            self.restored_weights = True
        elif state is not None:
            load_optimizer_state(root, opt, state["optimizer"])
        if state is not None:
            sched.load_state_dict(state["scheduler"])
            ckpt.set_rng_state(state["rng"])
            step, position, elapsed = state["step"], state["position"], state.get("elapsed", 0.0)
            if "nonfinite" in state:
                self.nonfinite.load_state_dict(state["nonfinite"])
            if self.info.is_main:
                print(f"resumed from {self.start_from} at step {step}")
        for log in (self.metrics, self.rows):
            if log is not None:
                log.truncate_after(step)  # those steps run again (all of them when no checkpoint was written)
        self.start_clock(elapsed)
        return step, position

    def start_clock(self, elapsed: float = 0.0) -> None:
        """Start the time budget's clock as if `elapsed` seconds had already passed."""
        self.t0 = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.schedule.max_seconds is not None and self.elapsed() >= self.schedule.max_seconds

    def save(self, step: int, position: int, model: Any, processor: Any, opt: Any, sched: Any, root: Any = None,
             extra: dict[str, Any] | None = None) -> None:
        """Checkpoint `step` (rank 0 writes; every rank waits): weights, optimizer, scheduler, RNG, position, and
        `extra` (more trainer state under its own keys, e.g. SFT's data stream; back in `resume_point`'s state).
        Full format: under FSDP2 (`root`) every rank first helps gather the whole weights and optimizer state to
        rank 0, so the checkpoint is the same at any world size and resumes at any other. Sharded: every rank
        writes its own part of the weights and optimizer state (`vlrl.train.checkpoint`), which resumes at any
        world size too."""
        barrier()
        sharded = self.schedule.checkpoint_format == "sharded"
        # LoRA (`model` is the peft model): the adapters only; the frozen base stays the start model's
        weights = None if sharded else trainable_state(root, model) if is_adapters(model) else model_state(root)
        optimizer = None if sharded else optimizer_state(root, opt)
        state = {"scheduler": sched.state_dict(), "rng": ckpt.rng_state(), "step": step, "position": position,
                 "elapsed": self.elapsed(), "nonfinite": self.nonfinite.state_dict(), **(extra or {})}  # fmt: skip
        keep = self.schedule.keep_checkpoints
        if sharded:
            target = root if root is not None else model
            ckpt.save_sharded_checkpoint(self.run_dir, step, lambda path: save_sharded(target, opt, path), model,
                                         processor, state, keep, self.info.is_main)
        elif self.info.is_main:
            ckpt.save_checkpoint(self.run_dir, step, model, processor, {"optimizer": optimizer, **state}, keep=keep,
                                 weights=weights)
        barrier()

    def _log(self, step: int, record: dict[str, Any], rows: list[dict[str, Any]], desc: str) -> None:
        """Write a logged step: metrics.jsonl, samples.jsonl, the trackers and (rank 0) the progress line."""
        line = self.metrics.log(record)
        self.nonfinite.unlogged = 0
        if self.rows is not None:
            for row in rows:
                self.rows.log(row)
        self.trackers.log(step, scalars_of(line), rows if self.rows is not None else [])
        if self.progress and self.info.is_main:
            tqdm.write(self.progress_line(step, line, desc))

    def progress_line(self, step: int, line: dict[str, Any], desc: str) -> str:
        """`desc step N/M  label value ...  S s/step`: the `progress` fields present in `line`, and the wall
        seconds per step since the previous line (validation and checkpoints included)."""
        t0, step0 = self._line_clock
        now = time.perf_counter()
        self._line_clock = (now, step)
        parts = [f"{desc} step {step}/{self.schedule.max_steps}"]
        parts += [f"{label} {_fmt(line[key])}" for key, label in self.progress if line.get(key) is not None]
        parts.append(f"{(now - t0) / max(1, step - step0):.2f} s/step")
        return "  ".join(parts)

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
        failed = True
        bar = None
        try:  # the trackers open before the bar, whose rate and ETA would otherwise count their start-up
            self.trackers.start(to_dict(self.config) if self.config is not None else {}, step)
            # a time-bounded run's step count is unknown until its pace is: no total before the first step
            bar = tqdm(total=s.max_steps if s.max_seconds is None else None, initial=step, desc=desc,
                       disable=not self.info.is_main)
            self._line_clock = t_loop = (time.perf_counter(), step)
            while step < s.max_steps and (step - first < s.min_steps or not self.out_of_time()):
                record, rows, position = step_fn(step, position)
                step += 1
                bar.update(1)
                if s.max_seconds is not None:
                    bar.total = steps_in_budget(s.max_steps, step, step - t_loop[1], time.perf_counter() - t_loop[0],
                                                s.max_seconds - self.elapsed())
                    bar.refresh()
                record = {"step": step, **record, "elapsed_s": self.elapsed()}
                self.nonfinite.count(record)
                if validate is not None and s.eval_every > 0 and self._due(step, s.eval_every):
                    t = time.perf_counter()
                    record.update(validate())
                    record["time/eval"] = time.perf_counter() - t
                if self._due(step, s.log_every) or "val_accuracy" in record:
                    self._log(step, record, rows, desc)
                    bar.set_postfix({postfix: f"{record[postfix]:.3f}"})
                self.nonfinite.check(step)
                if save is not None and (self._due(step, s.save_every) or self.out_of_time()):
                    save(step, position)
            failed = False
        finally:
            if bar is not None:
                bar.close()
            self.trackers.close(failed)
        if save is None:
            return step
        last = ckpt.latest_checkpoint(self.run_dir)
        if last is None or last.name != f"step-{step}":
            save(step, position)
        return step


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
