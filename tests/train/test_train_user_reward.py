"""RL on the tiny model with rewards loaded from a file of the user's own (`rewards/mine.py:function`, a path
relative to the current directory): it trains, logs `reward/<key>` every step, and a file whose rewards raise or
return the wrong length or hang on every call leaves them unscored while the run completes its steps."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.train.logging import read_metrics
from vlrl.train.rl import RLConfig, run_rl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS, B, G = 3, 2, 2

REWARDS = r'''
"""Rewards that vary from one completion of the untrained tiny model to the next, so groups carry signal."""
import os

with open(os.path.join(os.path.dirname(__file__), "loaded_by.txt"), "a") as f:  # which processes loaded this file
    f.write(f"{os.getpid()}\n")


def distinct_chars(completions, samples, *, scale=1.0):
    return [scale * len(set(c)) / max(1, len(c)) for c in completions]


def short(completions, samples, completion_lengths=None):
    lengths = completion_lengths or [len(c.split()) for c in completions]
    return [-float(n) / 8 for n in lengths]


def broken(completions, samples):
    raise RuntimeError("this reward always fails")


def wrong_length(completions, samples):
    return [1.0] * (len(completions) + 1)


def hangs(completions, samples):
    import time

    time.sleep(3600)
'''


def _run(model: Path, data: Path, out: Path, rewards: str, over: dict[str, object] | None = None) -> Path:
    """3 steps of the tiny GRPO recipe from the untrained tiny model, B=2 prompts x G=2 completions, no replay, no
    KL reference (so only the rewards move the weights)."""
    base: dict[str, object] = {
        "model": model, "data": f"[{data / 'counting' / 'train.jsonl'}]", "out": out, "max_steps": STEPS,
        "rewards": rewards, "validation.data": "[]", "replay.data": "[]", "replay.coef": 0.0, "threads": 1,
        "rollout.batch_size": B, "rollout.group_size": G, "rollout.max_new_tokens": 8, "rollout.temperature": 1.0,
        "rollout.dynamic_sampling": "false", "algorithm.beta": 0.0, "micro_batch_size": 4,
        "logging.save_every": 100, "logging.log_every": 1,
    }  # fmt: skip
    base.update(over or {})
    cfg = load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in base.items()])
    return run_rl(cfg)


@pytest.fixture
def reward_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rewards" / "mine.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(REWARDS), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the spec names the file relative to the current directory
    return path


def test_rl_trains_with_file_rewards_in_reward_workers(
    tiny_model_dir, synth_dir, tmp_path, reward_file
) -> None:
    rewards = "[{name: rewards/mine.py:distinct_chars, kwargs: {scale: 2.0}}, {name: rewards/mine.py:short, label: brevity, weight: 0.5}]"
    final = _run(tiny_model_dir, synth_dir, tmp_path / "run", rewards, {"rollout.reward_workers": 1})
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert 0.0 < m["reward/distinct_chars"] <= 2.0  # default key: the function's name
        assert m["reward/brevity"] < 0.0  # the label; its function got the trainer's token counts
        assert m["reward/unscored"] == 0.0
    samples = read_metrics(tmp_path / "run" / "samples.jsonl")
    assert samples and all({"reward/distinct_chars", "reward/brevity"} <= set(s) for s in samples)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "run" / "config.yaml").read_text().count("rewards/mine.py:") == 2  # as written
    loaded_by = set((reward_file.parent / "loaded_by.txt").read_text().split())
    assert str(os.getpid()) in loaded_by and len(loaded_by) == 2  # the trainer (config check) and its worker


def test_rl_completes_when_a_file_reward_fails_on_every_call(
    tiny_model_dir, synth_dir, tmp_path, reward_file
) -> None:
    """Documented None handling: an exception, a malformed result (here the wrong length) or a call that hangs
    past `rollout.reward_timeout` (killed in its worker) on every call makes that reward None for every
    completion; a row no reward can score is unscored (no advantage); the run goes on."""
    rewards = "[{name: rewards/mine.py:broken}, {name: rewards/mine.py:wrong_length}, {name: rewards/mine.py:hangs}]"
    final = _run(tiny_model_dir, synth_dir, tmp_path / "run", rewards,
                 {"rollout.reward_workers": 1, "rollout.reward_timeout": 1.0})
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert m["reward/unscored"] == B * G
        for key in ("broken", "wrong_length", "hangs"):
            assert m[f"reward/{key}"] == 0.0  # the mean of no scored value
        assert m["time/reward"] < 30.0  # the hanging call was cut at its time limit, not waited for
    assert (final / "model.safetensors").exists()
