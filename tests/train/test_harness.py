"""The run harness without a model: the SFT/RL schedule (log and save steps, the checkpoint at the end, a run
resumed out of time takes no step) and the curate one (no checkpoint, at least `min_steps` steps per call)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlrl.train.checkpoint import STATE_FILE
from vlrl.train.dist import DistInfo
from vlrl.train.harness import RunHarness, Schedule
from vlrl.train.logging import read_metrics

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Steps:
    """A step function that records its calls and advances the position by 10 a step."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, step: int, position: int) -> tuple[dict, list, int]:
        self.calls.append((step, position))
        return {"loss": float(step)}, [], position + 10


class Saves:
    """A save that writes only what `latest_checkpoint` looks for, and records (step, position)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.calls: list[tuple[int, int]] = []

    def __call__(self, step: int, position: int) -> None:
        self.calls.append((step, position))
        folder = self.run_dir / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).write_bytes(b"")


def test_sft_schedule_logs_and_saves_on_its_steps_and_at_the_end(tmp_path):
    harness = RunHarness(tmp_path, INFO, Schedule(5, None, save_every=2, keep_checkpoints=0, log_every=2,
                                                  eval_every=0))
    steps, saves = Steps(), Saves(tmp_path)
    harness.start_clock()
    last = harness.loop(0, 0, steps, save=saves, validate=None, desc="t", postfix="loss")
    assert last == 5 and steps.calls == [(0, 0), (1, 10), (2, 20), (3, 30), (4, 40)]
    assert saves.calls == [(2, 20), (4, 40), (5, 50)]  # the last step is due, so no second save at the end
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [(m["step"], m["loss"]) for m in lines] == [(2, 1.0), (4, 3.0), (5, 4.0)]
    assert [list(m) for m in lines] == [["step", "loss", "elapsed_s"]] * 3


def test_a_run_resumed_out_of_time_takes_no_step_and_still_ends_on_a_checkpoint(tmp_path):
    harness = RunHarness(tmp_path, INFO, Schedule(5, 1.0, save_every=0, keep_checkpoints=0, log_every=1,
                                                  eval_every=0))
    steps, saves = Steps(), Saves(tmp_path)
    harness.start_clock(elapsed=2.0)  # as restored from a checkpoint written after the budget ran out
    assert harness.loop(3, 30, steps, save=saves, validate=None, desc="t", postfix="loss") == 3
    assert steps.calls == [] and saves.calls == [(3, 30)]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_min_steps_run_before_the_budget_and_no_save_writes_no_checkpoint(tmp_path):
    harness = RunHarness(tmp_path, INFO, Schedule(10, 1.0, save_every=0, keep_checkpoints=0, log_every=1,
                                                  eval_every=0, min_steps=2))
    steps = Steps()
    harness.start_clock(elapsed=2.0)  # out of time before the first step
    assert harness.loop(4, 0, steps, save=None, validate=None, desc="t", postfix="loss") == 6
    assert steps.calls == [(4, 0), (5, 10)]
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [5, 6]
    assert not (tmp_path / "checkpoints").exists()
    unbounded = RunHarness(tmp_path / "u", INFO, Schedule(3, None, 0, 0, 1, 0, min_steps=1))
    assert unbounded.loop(0, 0, Steps(), save=None, validate=None, desc="t", postfix="loss") == 3
