"""`checkpoint_format: sharded` (vlrl.train.checkpoint, RunHarness.save / restore): every rank writes its own part of
the weights and optimizer state with torch.distributed.checkpoint; a resume reads it at any world size and under
any `parallel`; a torn save is never picked up; `vlrl export` turns it into a Hugging Face folder, and loading the
checkpoint folder itself says to export it. SFT and RL save and restore through the same `RunHarness.save` /
`restore` (RL's only addition: its rollout engine resyncs after a sharded restore), so the torchrun test runs SFT,
the cheaper of the two; RL's resume from a sharded checkpoint is checked in one process."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from proc_tree import kill_tree
from safetensors.torch import load_file
from test_parallel import _close, _finish, _launch, _sft, _weights
from transformers import AutoModelForImageTextToText

from vlrl.cli import main
from vlrl.config import ConfigError
from vlrl.models.loading import SHARDED_STATE, load_model
from vlrl.models.processor import load_processor
from vlrl.train import checkpoint as ckpt
from vlrl.train.dist import DistInfo
from vlrl.train.harness import RunHarness, Schedule, format_of
from vlrl.train.optim import make_optimizer, make_scheduler
from vlrl.train.parallel import Root

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
K = 3  # the step the unit tests save


def _setup(model_dir: Path) -> tuple[Root, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    root = Root(load_model(model_dir))
    opt = make_optimizer([p for p in root.parameters() if p.requires_grad], 1e-2, 0.1)
    return root, opt, make_scheduler(opt, 1, 10, 0.1)


def _train(root: Root, opt: torch.optim.Optimizer, sched, steps: int) -> None:
    """`steps` AdamW steps on a loss of the language model's weights only: the vision tower gets no gradient, so
    AdamW keeps no state for it (as on text-only data)."""
    lm = [p for n, p in root.named_parameters() if "visual" not in n]
    for _ in range(steps):
        sum((p - 0.01).pow(2).mean() for p in lm).backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A run directory with one sharded checkpoint at step K; the trained model, optimizer, scheduler and RNG
    state it was written from; and a copy of the model's weights then (a test may train the model on)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    root, opt, sched = _setup(tiny_model_dir)
    _train(root, opt, sched, K)
    harness = RunHarness(run, INFO, Schedule(10, None, 0, 2, 1, 0, checkpoint_format="sharded"))
    rng = torch.get_rng_state()
    harness.save(K, 17, root.model, load_processor(tiny_model_dir), opt, sched, root=root, extra={"stream": {"a": 1}})
    return run, root, opt, sched, rng, {k: v.clone() for k, v in root.model.state_dict().items()}


def test_sharded_save_resumes_weights_optimizer_scheduler_and_step(saved, tiny_model_dir):
    run, root, opt, sched, rng, _ = saved
    folder = run / "checkpoints" / f"step-{K}"
    assert ckpt.list_checkpoints(run) == [folder]
    assert (folder / SHARDED_STATE / "__0_0.distcp").exists() and (folder / "config.json").exists()
    assert not list(folder.glob("*.safetensors"))  # no gathered weights
    state = ckpt.load_state(folder)  # weights_only=True: tensors and plain values only
    assert ckpt.is_sharded(state) and "optimizer" not in state

    torch.manual_seed(123)  # another RNG state, which restore must replace with the saved one
    root2, opt2, sched2 = _setup(tiny_model_dir)
    assert not all(torch.equal(a, b) for a, b in zip(root.state_dict().values(), root2.state_dict().values()))
    harness = RunHarness(run, INFO, Schedule(10, None, 0, 2, 1, 0))  # the current setting is full: either resumes
    start_from, state = harness.resume_point(str(tiny_model_dir))
    assert start_from == str(tiny_model_dir) and state is not None  # built from the start model, weights via DCP
    assert harness.restore(state, opt2, sched2, root2) == (K, 17) and state["stream"] == {"a": 1}
    assert harness.restored_weights
    for (n, a), (n2, b) in zip(root.state_dict().items(), root2.state_dict().items()):
        assert n == n2 and torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) < len(list(root.parameters()))
    for i in s1["state"]:
        for key, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][key]), (i, key)
    assert sched.state_dict() == sched2.state_dict()  # type: ignore[attr-defined]
    assert torch.equal(torch.get_rng_state(), rng)
    # the resumed optimizer steps as the saved one does
    _train(root, opt, sched, 1)
    _train(root2, opt2, sched2, 1)
    assert all(torch.equal(a, b) for a, b in zip(root.state_dict().values(), root2.state_dict().values()))


def test_format_key(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint_format 'dcp'; valid: full, sharded"):
        RunHarness(tmp_path, INFO, Schedule(1, None, 0, 0, 1, 0, checkpoint_format="dcp"))
    assert format_of("sharded", lora=False) == "sharded"
    assert format_of("sharded", lora=True) == "full"  # LoRA saves its (small) adapters whole


def test_torn_sharded_save_is_not_picked_up_and_pruning_works(saved, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved[0], run)
    # every rank's shards written, but killed before rank 0 renamed the folder
    shutil.copytree(run / "checkpoints" / f"step-{K}", run / "checkpoints" / f"step-{K + 1}.tmp")
    harness = RunHarness(run, INFO, Schedule(10, None, 0, 1, 1, 0, checkpoint_format="sharded"))
    _, state = harness.resume_point(str(tiny_model_dir))
    assert state is not None and state["step"] == K
    root, opt, sched = _setup(tiny_model_dir)
    harness.restore(state, opt, sched, root)
    harness.save(K + 2, 0, root.model, load_processor(tiny_model_dir), opt, sched, root=root)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{K + 2}"]  # .tmp removed, K pruned


def test_export_of_a_sharded_checkpoint_loads_with_the_trained_weights(saved, tmp_path):
    run, *_, trained = saved
    folder = run / "checkpoints" / f"step-{K}"
    with pytest.raises(ValueError, match="vlrl export --checkpoint"):
        load_model(folder)
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    loaded = exported.state_dict()
    assert loaded.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(loaded[k], v), k
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "bf16" / "model.safetensors").values())


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_at_one_and_four_ranks(tiny_model_dir, synth_dir, tmp_path):
    """An FSDP2 run at 2 ranks writing sharded checkpoints, SIGKILLed after step 2, resumes at 1 rank (writing the
    full format: the format may change on resume) and at 4 ranks (sharded, exported) to the weights of an
    uninterrupted 1-process run."""
    _finish(_launch(_sft(tiny_model_dir, synth_dir, tmp_path / "ref", 4), 1))
    ref = _weights(tmp_path / "ref", 4)
    run = tmp_path / "run"
    args = _sft(tiny_model_dir, synth_dir, run, 4, "parallel=fsdp", "checkpoint_format=sharded")
    proc = _launch(args, 2)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step-2").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert not (run / "checkpoints" / "step-4").exists()  # it really died mid-run
    step2 = run / "checkpoints" / "step-2"
    assert sorted(p.name for p in (step2 / SHARDED_STATE).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(step2.glob("*.safetensors"))
    shutil.copytree(run, tmp_path / "run4")

    out = _finish(_launch([*args[:-2], "parallel=none", "checkpoint_format=full"], 1))
    assert "resumed from" in out
    assert _close(_weights(run, 4), ref) < 1e-4

    run4 = tmp_path / "run4"
    out = _finish(_launch(_sft(tiny_model_dir, synth_dir, run4, 4, "parallel=fsdp", "checkpoint_format=sharded"), 4))
    assert "resumed from" in out
    step4 = run4 / "checkpoints" / "step-4"
    assert len(list((step4 / SHARDED_STATE).glob("*.distcp"))) == 4
    assert main(["export", "--checkpoint", str(step4), "--out", str(tmp_path / "hf4")]) == 0
    assert _close(load_file(tmp_path / "hf4" / "model.safetensors"), ref) < 1e-4


@pytest.mark.slow
def test_rl_resumes_from_a_sharded_checkpoint(tiny_model_dir, synth_dir, tmp_path, capsys):
    """RL saves and restores through the same harness (only its engine resyncs after a sharded restore): a run
    whose last checkpoint is gone (as if killed after step 1's save) re-runs step 2 from step 1's sharded
    checkpoint to the same weights, in one process without a process group."""
    from vlrl import recipes_dir
    from vlrl.config import load_config
    from vlrl.train.rl import RLConfig, run_rl

    data = synth_dir / "counting" / "train.jsonl"
    over = {"model": tiny_model_dir, "data": f"[{data}]", "replay.data": f"[{data}]", "validation.data": "[]",
            "out": tmp_path / "run", "max_steps": 2, "rollout.batch_size": 2, "rollout.group_size": 4,
            "rollout.max_new_tokens": 8, "threads": 1, "logging.save_every": 1, "checkpoint_format": "sharded"}
    cfg = load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()])
    step2 = run_rl(cfg)
    assert (step2 / SHARDED_STATE / ".metadata").exists() and (step2.parent / "step-1" / SHARDED_STATE).exists()
    assert main(["export", "--checkpoint", str(step2), "--out", str(tmp_path / "first")]) == 0
    shutil.rmtree(step2)
    capsys.readouterr()
    assert run_rl(cfg) == step2
    assert f"resumed from {step2.parent / 'step-1'} at step 1" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(step2), "--out", str(tmp_path / "again")]) == 0
    first, again = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(first[k], start[k]) for k in start)  # the steps trained
    assert _close(first, again) < 1e-6
