"""The run harness without a model: the SFT/RL schedule (log and save steps, the checkpoint at the end, a run
resumed out of time takes no step) and the curate one (no checkpoint, at least `min_steps` steps per call); the
progress lines."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlrl.train.checkpoint import STATE_FILE
from vlrl.train.dist import DistInfo
from vlrl.train.harness import RL_PROGRESS, SFT_PROGRESS, RunHarness, Schedule
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


class Records:
    """A step function returning fixed metrics (and one sample row a step), as SFT or RL would."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def __call__(self, step: int, position: int) -> tuple[dict, list, int]:
        return dict(self.record), [{"step": step + 1, "completion": "<answer>1</answer>"}], position + 1


def test_progress_lines_print_the_fields_present_on_each_logged_step(tmp_path, capsys):
    harness = RunHarness(tmp_path, INFO, Schedule(4, None, save_every=0, keep_checkpoints=0, log_every=2,
                                                  eval_every=0), progress=RL_PROGRESS)
    record = {"reward/mean": 0.25, "reward/accuracy": 0.125, "completion/len_mean": 7.5, "loss": 1.0}
    harness.loop(0, 0, Records(record), save=None, validate=None, desc="rl/ppo_clip", postfix="reward/mean")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2  # steps 2 and 4 are logged
    for ln, step in zip(lines, (2, 4)):
        assert re.fullmatch(rf"rl/ppo_clip step {step}/4  reward 0\.25  accuracy 0\.125  length 7\.5  "
                            r"\d+\.\d\d s/step", ln), ln  # no kl: the record has none (beta = 0)


def test_sft_progress_shows_loss_and_lr_and_no_fields_means_no_line(tmp_path, capsys):
    sft = RunHarness(tmp_path / "sft", INFO, Schedule(1, None, 0, 0, 1, 0), progress=SFT_PROGRESS)
    sft.loop(0, 0, Records({"loss": 2.5, "lr": 3e-05}), save=None, validate=None, desc="sft/full", postfix="loss")
    out = capsys.readouterr().out
    assert re.search(r"^sft/full step 1/1  loss 2\.5  lr 3e-05  \d+\.\d\d s/step$", out, re.M), out
    quiet = RunHarness(tmp_path / "q", INFO, Schedule(1, None, 0, 0, 1, 0))
    quiet.loop(0, 0, Records({"loss": 2.5}), save=None, validate=None, desc="curate", postfix="loss")
    assert capsys.readouterr().out.strip() == ""


def test_a_fresh_start_drops_metrics_lines_left_by_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    harness = RunHarness(tmp_path, INFO, Schedule(2, None, 0, 0, 1, 0))
    assert harness.restore(None, None, None) == (0, 0)
    assert not (tmp_path / "metrics.jsonl").read_text().strip()


def test_steps_in_budget_is_the_step_the_time_budget_ends_on() -> None:
    """The progress bar's total for a time-bounded run: steps so far plus the seconds left at the pace so far."""
    from vlrl.train.harness import steps_in_budget

    # 10 steps in 5 s (2 steps/s), 30 s left: 60 more steps, far below a max_steps of 1,000,000
    assert steps_in_budget(1_000_000, 10, 10, 5.0, 30.0) == 70
    assert steps_in_budget(50, 10, 10, 5.0, 30.0) == 50  # max_steps comes first
    assert steps_in_budget(1_000_000, 12, 2, 1.0, -3.0) == 12  # out of time: it ends here
    assert steps_in_budget(80, 0, 0, 0.0, 30.0) == 80  # no pace yet
