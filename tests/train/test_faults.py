"""Fault injection on the tiny model (issue 18): a loss or gradient that is not finite is skipped, counted and stops
the run after `nonfinite_limit` in a row; a checkpoint write that fails leaves the previous checkpoint as the one
resume takes; SIGKILL at five points of an RL run resumes to the uninterrupted run's weights. Faults are injected
from the test side (monkeypatch in-process, or a wrapper script in the killed subprocess)."""

from __future__ import annotations

import errno
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from killrun import run_killed
from safetensors.torch import load_file

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.train import rl_update, sft
from vlrl.train.checkpoint import list_checkpoints
from vlrl.train.harness import NonFiniteError
from vlrl.train.logging import read_metrics
from vlrl.train.rl import RLConfig, run_rl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# rewards that vary between completions of the untrained tiny model, so that every step moves the weights
REWARDS = '''
def distinct_chars(completions, samples):
    return [len(set(c)) / max(1, len(c)) for c in completions]
'''


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _sft_cfg(model: Path, data: Path, out: Path, **kw: Any) -> sft.SFTConfig:
    base: dict[str, Any] = dict(model=str(model), data=[str(data / "counting" / "train.jsonl")], out=str(out),
                                max_steps=4, batch_size=4, micro_batch_size=4, warmup_steps=0, save_every=1,
                                keep_checkpoints=0, log_every=1, threads=1, lr=1e-2)
    return sft.SFTConfig(**{**base, **kw})


def rl_overrides(model: Path, data: Path, out: Path, steps: int, rewards: Path,
                 over: dict[str, object] | None = None) -> list[str]:
    """`--config` and overrides: a few steps of the tiny GRPO recipe from the untrained tiny model, B=2 x G=2, one
    update a step, rewarded by the `REWARDS` file `rewards`, a checkpoint every step (all kept)."""
    base: dict[str, object] = {
        "model": model, "data": f"[{data / 'counting' / 'train.jsonl'}]", "out": out, "max_steps": steps,
        "rewards": f"[{{name: {rewards}:distinct_chars}}]", "validation.data": "[]", "replay.data": "[]",
        "replay.coef": 0.0, "threads": 1, "rollout.batch_size": 2, "rollout.group_size": 2,
        "rollout.max_new_tokens": 6, "rollout.dynamic_sampling": "false", "algorithm.beta": 0.0,
        "micro_batch_size": 4, "logging.save_every": 1, "logging.keep_checkpoints": 0, "logging.log_every": 1,
    }  # fmt: skip
    base.update(over or {})
    return ["--config", str(recipes_dir() / "tiny-grpo.yaml"), *[f"{k}={v}" for k, v in base.items()]]


@pytest.fixture(scope="module")
def rewards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "mine.py"
    path.write_text(textwrap.dedent(REWARDS))
    return path


def _rl(args: list[str]) -> Path:
    """`run_rl` in-process on `rl_overrides` arguments, the torch thread count restored after."""
    before = torch.get_num_threads()
    try:
        return run_rl(load_config(RLConfig, args[1], args[2:]))
    finally:
        torch.set_num_threads(before)


# --- non-finite loss ------------------------------------------------------------------------------------------


def _poison_sft(monkeypatch: pytest.MonkeyPatch, steps: set[int] | None) -> None:
    """Make the SFT loss NaN on the given (0-based) steps, every step when None (one micro-batch a step)."""
    real, calls = sft._micro_loss, []

    def micro(model: Any, batch: Any, agg: str, n: int) -> tuple[torch.Tensor, float]:
        loss, value = real(model, batch, agg, n)
        calls.append(1)
        if steps is None or len(calls) - 1 in steps:
            return loss * float("nan"), float("nan")
        return loss, value

    monkeypatch.setattr(sft, "_micro_loss", micro)


def test_sft_skips_a_nonfinite_step_leaving_the_weights_and_counts_it(tiny_model_dir, synth_dir, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    _poison_sft(monkeypatch, {1, 2})
    sft.run_sft(_sft_cfg(tiny_model_dir, synth_dir, tmp_path / "run", nonfinite_limit=3))
    c = {p.name: p for p in list_checkpoints(tmp_path / "run")}
    assert _same(c["step-1"], c["step-2"]) and _same(c["step-2"], c["step-3"])  # steps 2, 3 skipped
    assert not _same(c["step-3"], c["step-4"]) and not _same(tiny_model_dir, c["step-1"])
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["skipped_nonfinite"] for m in lines] == [0, 1, 1, 0]
    assert [m["skipped_nonfinite_total"] for m in lines] == [0, 1, 2, 2]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # no optimizer step yet
def test_sft_stops_after_nonfinite_limit_steps_in_a_row(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    _poison_sft(monkeypatch, None)
    with pytest.raises(NonFiniteError, match=r"2 steps in a row.*nonfinite_limit"):
        sft.run_sft(_sft_cfg(tiny_model_dir, synth_dir, tmp_path / "run", nonfinite_limit=2))
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(m["step"], m["skipped_nonfinite"]) for m in lines] == [(1, 1), (2, 1)]
    (first,) = list_checkpoints(tmp_path / "run")  # saved before the second bad step; the start weights
    assert first.name == "step-1" and _same(tiny_model_dir, first)


def test_rl_skips_an_update_whose_loss_is_infinite(tiny_model_dir, synth_dir, tmp_path, monkeypatch, rewards):
    real, calls = rl_update.agg_loss, []

    def agg(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("inf") if len(calls) == 2 else loss  # the second step's only micro-batch

    monkeypatch.setattr(rl_update, "agg_loss", agg)
    _rl(rl_overrides(tiny_model_dir, synth_dir, tmp_path / "run", 3, rewards))
    c = {p.name: p for p in list_checkpoints(tmp_path / "run")}
    assert _same(c["step-1"], c["step-2"]) and not _same(c["step-2"], c["step-3"])
    assert not _same(tiny_model_dir, c["step-1"])
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["skipped_nonfinite"] for m in lines] == [0, 1, 0] and lines[-1]["skipped_nonfinite_total"] == 1


# --- a checkpoint write that fails ----------------------------------------------------------------------------


def test_a_failed_checkpoint_write_stops_the_run_and_resume_takes_the_previous_checkpoint(tiny_model_dir, synth_dir,
                                                                                          tmp_path, monkeypatch):
    from vlrl.train import checkpoint

    real_save = torch.save

    def full_disk(obj: Any, path: Any, *args: Any, **kw: Any) -> None:
        if Path(path).parent.name == "step-4.tmp":
            Path(path).write_bytes(b"half a trainer st")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path, *args, **kw)

    out = tmp_path / "run"
    cfg = _sft_cfg(tiny_model_dir, synth_dir, out, max_steps=6, save_every=2)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    clear = r"could not write checkpoint .*step-4: .*No space left.*resumes from .*step-2"
    with pytest.raises(RuntimeError, match=clear):
        sft.run_sft(cfg)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [p.name for p in list_checkpoints(out)] == ["step-2"] and not (out / "checkpoints" / "step-4.tmp").exists()
    stale = out / "checkpoints" / "step-6.tmp"  # what a write cut short by a kill (or an unwritable disk) leaves
    stale.mkdir()
    torch.save({"step": 6, "position": 0}, stale / "trainer_state.pt")
    assert [p.name for p in list_checkpoints(out)] == ["step-2"]  # never taken for a checkpoint
    sft.run_sft(cfg)  # resumes from step-2; its first save removes the leftover
    assert not stale.exists()
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    ref = sft.run_sft(_sft_cfg(tiny_model_dir, synth_dir, tmp_path / "ref", max_steps=6, save_every=2))
    assert _same(ref, out / "checkpoints" / "step-6")


# --- SIGKILL at five points of an RL step ---------------------------------------------------------------------

STEPS = 4  # checkpoints at steps 2 and 4 (logging.save_every=2)
# (point, call that dies): each in step 3, after the step-2 checkpoint; the checkpoint write is step 4's
KILLS = [("rollout", 3), ("reward", 3), ("update", 3), ("checkpoint", 2), ("metrics", 3)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, synth_dir, rewards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return _rl(rl_overrides(tiny_model_dir, synth_dir, out, STEPS, rewards, {"logging.save_every": 2}))


@pytest.mark.parametrize(("point", "at"), KILLS)
def test_sigkill_at_a_point_of_an_rl_step_then_rerun_resumes_to_the_uninterrupted_weights(
        point, at, tiny_model_dir, synth_dir, rewards, uninterrupted, tmp_path):  # fmt: skip
    out = tmp_path / "run"
    args = rl_overrides(tiny_model_dir, synth_dir, out, STEPS, rewards, {"logging.save_every": 2})
    run_killed(["rl", *args], point, at)
    assert [p.name for p in list_checkpoints(out)] == ["step-2"]  # it died in step 3 or writing step 4
    final = _rl(args)  # the same command again
    assert _same(uninterrupted, final)
    ref, run = read_metrics(uninterrupted.parents[1] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in run] == list(range(1, STEPS + 1))  # each step once, the torn line gone
    assert [m["reward/mean"] for m in run] == [m["reward/mean"] for m in ref]
