"""RL on the tiny model for real (after a short SFT so that rewards vary): the GSPO, DAPO and Dr.GRPO tiny
recipes train for 20 steps; torchrun steps of 2 and 4 processes (ddp and fsdp) equal the 1-process ones; SIGKILL
then the same command resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killrun import kill_when_exists
from safetensors.torch import load_file

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.train.logging import read_metrics
from vlrl.train.rl import RLConfig, run_rl
from vlrl.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.slow

RECIPES = recipes_dir()


@pytest.fixture
def one_thread():
    """Run in-process training on one thread (much faster for this model when the 2 cores are shared), then
    restore the thread count for the other tests."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_model(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """A few SFT steps: the policy half-learns the `<answer>N</answer>` format, so rewards vary within groups."""
    out = tmp_path_factory.mktemp("rl-sft")
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")], out=str(out),
                    max_steps=10, batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=2, save_every=100,
                    log_every=5, threads=1)
    before = torch.get_num_threads()
    try:
        return run_sft(cfg)
    finally:
        torch.set_num_threads(before)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _overrides(model: Path, data: Path, out: Path, steps: int, over: dict[str, object] | None = None) -> list[str]:
    """Command-line overrides of a tiny recipe: a short run on counting; `over` adds or replaces keys (dotted for
    a section's keys, `algorithm.beta`)."""
    base = {"model": model, "data": f"[{data / 'counting' / 'train.jsonl'}]", "validation.data": "[]", "out": out,
            "replay.data": f"[{data / 'counting' / 'train.jsonl'}]", "max_steps": steps, "rollout.batch_size": 2,
            "rollout.group_size": 4, "rollout.max_new_tokens": 8, "logging.save_every": 100}
    base.update(over or {})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("recipe", ["tiny-gspo", "tiny-dapo", "tiny-drgrpo"])
def test_tiny_recipe_trains_20_steps(recipe, sft_model, synth_dir, tmp_path, one_thread):
    overrides = _overrides(sft_model, synth_dir, tmp_path / "run", 20, {"threads": one_thread})
    cfg = load_config(RLConfig, RECIPES / f"{recipe}.yaml", overrides)
    final = run_rl(cfg)
    before, after = _weights(sft_model), _weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    for m in metrics:
        assert isinstance(m["reward/mean"], float) and isinstance(m["reward/accuracy"], float)
        assert all(m[f"time/{s}"] >= 0 for s in ("rollout", "reward", "ref_logp", "old_logp", "update", "step"))
    assert any(m["adv/std"] > 0 for m in metrics)  # some groups carried signal
    samples = read_metrics(tmp_path / "run" / "samples.jsonl")
    assert samples and {"completion", "reward", "advantage"} <= set(samples[0])
    if recipe == "tiny-gspo":
        assert all(m["updates"] == 2 for m in metrics)  # two minibatches per step
        assert any(m["ratio/mean"] != 1.0 for m in metrics)  # the second one is off-policy
    if recipe == "tiny-dapo":
        assert all(isinstance(m["reward/overlong"], float) for m in metrics)
        for m in metrics:  # every trained group carries signal unless a step gave up (then it says so)
            assert m["adv/frac_zero_std_groups"] == 0.0 or m["dynamic/fallback"] == 1.0
            refilled = m["dynamic/prompts"] > cfg.rollout.batch_size
            assert refilled == (m["dynamic/tries"] > 1) and (m["frac_zero_std_groups"] > 0 or not refilled)
        assert sum(m["dynamic/prompts"] for m in metrics) > 20 * cfg.rollout.batch_size  # some groups were refilled


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _rl_args(recipe: str, model: Path, data: Path, out: Path, steps: int, over: dict[str, object]) -> list[str]:
    return ["rl", "--config", str(RECIPES / f"{recipe}.yaml"),
            *_overrides(model, data, out, steps, {"threads": 1, **over})]


# beta > 0 (reference model), dynamic sampling and two minibatches: every cross-rank path at once and
# demonstration replay (its batch split across ranks like the RL rows); the vision tower trains (the recipe freezes
# it) so its gradients are reduced across ranks too
CROSS_RANK = {"rollout.batch_size": 4, "rollout.dynamic_sampling": "true", "algorithm.num_minibatches": 2,
              "logging.log_samples": 8, "replay.coef": 0.5, "replay.batch_size": 6, "optim.freeze_vision": "false"}


@pytest.fixture(scope="module")
def one_process_run(sft_model, synth_dir, tmp_path_factory) -> Path:
    """The 2-step `CROSS_RANK` run of one process that the torchrun runs are compared with (in this process: no
    launch to pay for)."""
    out = tmp_path_factory.mktemp("rl-one") / "one"
    over = _overrides(sft_model, synth_dir, out, 2, {"threads": 1, **CROSS_RANK})
    before = torch.get_num_threads()
    try:
        run_rl(load_config(RLConfig, RECIPES / "tiny-grpo.yaml", over))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(("parallel", "ranks", "checkpointing"),
                         [("ddp", 2, False), ("fsdp", 2, True), ("ddp", 4, False), ("fsdp", 4, False)])
def test_torchrun_ranks_match_one_process(sft_model, synth_dir, tmp_path, parallel, ranks, checkpointing,
                                          one_process_run):
    """`checkpointing`: activation checkpointing (with the shared prefix, under FSDP2) replays the same forwards,
    so it is compared with the same 1-process run without it."""
    kw = {**CROSS_RANK, "parallel": parallel, **({"gradient_checkpointing": True} if checkpointing else {})}
    (tmp_path / "one").symlink_to(one_process_run, target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
                          "-m", "vlrl.cli", *_rl_args("tiny-grpo", sft_model, synth_dir, tmp_path / "two", 2, kw)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        for key in ("reward/mean", "reward/std", "dynamic/prompts", "completion/len_mean", "adv/std"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("loss", "kl", "entropy", "grad_norm", "sft_replay/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
    s1, s2 = read_metrics(tmp_path / "one" / "samples.jsonl"), read_metrics(tmp_path / "two" / "samples.jsonl")
    assert [s["completion"] for s in s1] == [s["completion"] for s in s2]  # same prompts, same completions
    w1, w2 = _weights(tmp_path / "one" / "checkpoints" / "step-2"), _weights(tmp_path / "two" / "checkpoints" / "step-2")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    assert any(not torch.equal(w1[k], _weights(sft_model)[k]) for k in w1)


def test_sigkill_then_rerun_resumes_exactly(sft_model, synth_dir, tmp_path):
    kw = {"logging.save_every": 2, "logging.keep_checkpoints": 10}
    ref = _cli(_rl_args("tiny-dapo", sft_model, synth_dir, tmp_path / "ref", 6, kw))
    args = _rl_args("tiny-dapo", sft_model, synth_dir, tmp_path / "run", 6, kw)
    proc = _cli(args)
    kill_when_exists(proc, tmp_path / "run" / "checkpoints" / "step-2")
    assert ref.wait(timeout=600) == 0, ref.stdout.read() if ref.stdout else ""
    assert not (tmp_path / "run" / "checkpoints" / "step-6").exists()  # it really died mid-run
    again = _cli(args)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert "resumed from" in out
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "step-6"), _weights(tmp_path / "run" / "checkpoints" / "step-6")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m_ref, m_run = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in m_run] == list(range(1, 7))  # no step logged twice after the resume
    assert [m["reward/mean"] for m in m_run] == [m["reward/mean"] for m in m_ref]  # same completions
    s_ref, s_run = read_metrics(tmp_path / "ref" / "samples.jsonl"), read_metrics(tmp_path / "run" / "samples.jsonl")
    assert [s["completion"] for s in s_run] == [s["completion"] for s in s_ref]


def test_kl_in_reward_frozen_vision_eval_and_time_budget(sft_model, synth_dir, tmp_path, one_thread):
    test = synth_dir / "counting" / "test.jsonl"
    over = _overrides(sft_model, synth_dir, tmp_path / "run", 3,
                      {"threads": one_thread, "algorithm.beta": 0.1, "algorithm.kl_in_reward": "true",
                       "algorithm.ppo_epochs": 2, "optim.freeze_vision": "true", "optim.freeze_merger": "true",
                       "validation.data": f"[{test}]", "validation.every": 3, "validation.limit": 8})
    final = run_rl(load_config(RLConfig, RECIPES / "tiny-grpo.yaml", over))
    before, after = _weights(sft_model), _weights(final)
    vision = [k for k in before if k.startswith("visual.") or ".visual." in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(m["updates"] == 2 and m["time/old_logp"] > 0 and m["time/ref_logp"] > 0 for m in metrics)
    assert all(isinstance(m["kl"], float) for m in metrics) and "val_accuracy" in metrics[-1]
    budget = _overrides(sft_model, synth_dir, tmp_path / "budget", 50, {"threads": one_thread, "max_seconds": 0.01})
    assert run_rl(load_config(RLConfig, RECIPES / "tiny-drgrpo.yaml", budget)).name == "step-1"


def test_sft_replay_adds_the_scaled_sft_gradient_of_its_step_batch(sft_model, synth_dir, tmp_path, one_thread):
    """PPO-ptx: the replay term is replay.coef x the SFT loss of `global_batch(step)` of replay.data, its gradient
    added to the RL gradient of the step's first update."""
    from vlrl.data.order import global_batch
    from vlrl.train.dist import init_distributed
    from vlrl.train.rl import build_run, replay_backward
    from vlrl.train.sft import sft_backward

    data = synth_dir / "chart" / "train.jsonl"
    over = _overrides(sft_model, synth_dir, tmp_path / "run", 3,
                      {"threads": one_thread, "replay.data": f"[{data}]", "replay.coef": 0.25, "replay.batch_size": 5})
    cfg = load_config(RLConfig, RECIPES / "tiny-grpo.yaml", over)
    info = init_distributed()
    run = build_run(cfg, info, str(sft_model))
    assert run.replay is not None and len(run.replay) == 48
    m = replay_backward(run, 7)
    scaled = [p.grad.clone() for p in run.params]
    run.opt.zero_grad(set_to_none=True)
    idx = global_batch(7, 5, 48, cfg.seed)
    assert idx != global_batch(6, 5, 48, cfg.seed)
    plain = sft_backward(run.model, run.processor, run.replay, idx, "sample", 64, info)
    assert m["sft_replay/loss"] == pytest.approx(plain["loss"], rel=1e-6) and plain["loss"] > 0
    for g, p in zip(scaled, run.params):
        torch.testing.assert_close(g, 0.25 * p.grad, rtol=1e-5, atol=1e-8)

    final = run_rl(cfg)  # and in a run: logged every step, and the weights differ from a run without replay
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 3 and all(m["sft_replay/loss"] > 0 for m in metrics)
    no_replay = _overrides(sft_model, synth_dir, tmp_path / "plain", 3, {"threads": one_thread, "replay.coef": 0})
    plain_run = run_rl(load_config(RLConfig, RECIPES / "tiny-grpo.yaml", no_replay))
    a, b = _weights(final), _weights(plain_run)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "sft_replay/loss" not in read_metrics(tmp_path / "plain" / "metrics.jsonl")[0]


def test_activation_checkpointing_makes_the_same_update(sft_model, synth_dir, tmp_path, one_thread):
    """`gradient_checkpointing: true` (the real-model recipes) recomputes activations in the backward and trains on
    the plain [prompt | completion] layout instead of the shared prefix: same rollouts, same weights after 2 steps."""
    from vlrl.rollout.prefix import uses_activation_checkpointing
    from vlrl.train.dist import init_distributed
    from vlrl.train.rl import build_run

    runs = {}
    for flag in ("false", "true"):
        over = _overrides(sft_model, synth_dir, tmp_path / "built", 1,
                          {"threads": one_thread, "gradient_checkpointing": flag})
        model = build_run(load_config(RLConfig, RECIPES / "tiny-grpo.yaml", over), init_distributed(),
                          str(sft_model)).model
        assert uses_activation_checkpointing(model) == (flag == "true")
        over = _overrides(sft_model, synth_dir, tmp_path / flag, 2,
                          {"threads": one_thread, "gradient_checkpointing": flag, "algorithm.beta": 0.04})
        runs[flag] = (run_rl(load_config(RLConfig, RECIPES / "tiny-grpo.yaml", over)), tmp_path / flag)
    plain, ckpt = (_weights(runs[f][0]) for f in ("false", "true"))
    before = _weights(sft_model)
    assert any(not torch.equal(before[k], plain[k]) for k in before)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6)
    m_plain, m_ckpt = (read_metrics(runs[f][1] / "metrics.jsonl") for f in ("false", "true"))
    assert [m["reward/mean"] for m in m_ckpt] == [m["reward/mean"] for m in m_plain]
    assert [m["kl"] for m in m_ckpt] == pytest.approx([m["kl"] for m in m_plain], rel=1e-4, abs=1e-7)
