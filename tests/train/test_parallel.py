"""`parallel: none | ddp | fsdp` (vlrl.train.parallel) on gloo ranks of this CPU: a SIGKILLed FSDP2 run resumes at
another world size to the uninterrupted run's weights (and, as two nodes, at the same one), and what the launch
cannot have is refused before anything loads. (2 and 4 ranks = 1 rank for ddp and fsdp, SFT and RL:
tests/train/test_train_sft.py and test_train_rl.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from proc_tree import kill_tree
from safetensors.torch import load_file

from vlrl.config import ConfigError
from vlrl.data.order import shard
from vlrl.train.logging import read_metrics
from vlrl.train.parallel import Root, call, clip_grads, unwrap, wrap
from vlrl.train.precision import precision_of
from vlrl.train.sft import SFTConfig, check_ranks


def test_shards_differ_by_at_most_one_and_cover_the_batch():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            parts = [shard(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_launch_checks():
    with pytest.raises(ConfigError, match="parallel none runs one process"):
        check_ranks("none", 2, 8)
    with pytest.raises(ConfigError, match="rollout.batch_size 1 leaves ranks without items at 2 ranks"):
        check_ranks("ddp", 2, 1, "rollout.batch_size")
    check_ranks("fsdp", 4, 4)
    with pytest.raises(ConfigError, match="cpu_offload moves"):
        check_ranks("fsdp", 2, 8, cpu_offload=True, device="cpu")
    check_ranks("fsdp", 2, 8, cpu_offload=True, device="cuda")
    with pytest.raises(ValueError, match="parallel"):
        SFTConfig(model="m", data=["d"], out="o", parallel="zero3")
    with pytest.raises(ValueError, match="cpu_offload needs parallel fsdp"):
        SFTConfig(model="m", data=["d"], out="o", cpu_offload=True)
    from vlrl.train.rl_config import RLConfig, RolloutConfig

    with pytest.raises(ValueError, match="parallel fsdp with rollout.engine vllm"):
        RLConfig(model="m", data=["d"], out="o", parallel="fsdp", rollout=RolloutConfig(engine="vllm"))


def test_one_process_is_a_plain_root_and_call_runs_through_it():
    info = __import__("vlrl.train.dist", fromlist=["DistInfo"]).DistInfo(0, 1, 0, torch.device("cpu"))
    model = torch.nn.Linear(3, 2)
    for mode in ("none", "ddp", "fsdp"):  # without a process group every mode is the model as it is
        root = wrap(model, mode, info, precision_of("float32"))
        assert isinstance(root, Root) and unwrap(root) is model and unwrap(model) is model
        x = torch.ones(1, 3)
        torch.testing.assert_close(call(root, lambda m, t: m(t), x), model(x))
    model(torch.ones(1, 3)).sum().backward()
    norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    assert clip_grads(list(model.parameters()), 1e9) == pytest.approx(norm)


def _sft(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["sft", f"model={model}", f"data=[{data / 'counting' / 'train.jsonl'}]", f"out={out}",
            f"max_steps={steps}", "batch_size=8", "micro_batch_size=2", "save_every=2", "log_every=1",
            "warmup_steps=1", "threads=1", "keep_checkpoints=10", *extra]


def _launch(args: list[str], ranks: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlrl.cli", *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", "-m",
         "vlrl.cli", *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # torchrun puts each rank in a session of its own: `kill_tree`


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out
    return out


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step}" / "model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-only SFT data in the layout `_sft` reads (`counting/train.jsonl`): sums to answer."""
    folder = tmp_path_factory.mktemp("text-only")
    (folder / "counting").mkdir()
    rows = [{"id": f"sum-{a}-{b}", "conversations": [{"from": "human", "value": f"What is {a} + {b}?"},
                                                      {"from": "gpt", "value": f"<answer>{a + b}</answer>"}],
             "answer": str(a + b), "problem_type": "numerical"} for a in range(1, 7) for b in range(1, 7)]
    (folder / "counting" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow
def test_fsdp_sigkill_resumes_at_two_ranks_and_at_one(tiny_model_dir, text_only_dir, tmp_path):
    """Checkpoints hold the whole weights and optimizer state, gathered from the shards: a run killed after step 2
    at 2 ranks resumes at 1 to the weights of an uninterrupted run, and a 1-process run resumes as FSDP2 at 2
    ranks. On text-only data: the vision tower never gets a gradient, so it has no AdamW state to load."""
    synth_dir = text_only_dir
    _finish(_launch(_sft(tiny_model_dir, synth_dir, tmp_path / "ref", 4, "parallel=fsdp"), 2))
    ref = _weights(tmp_path / "ref", 4)
    for first, again in ((2, 1), (1, 2)):  # 2 -> 2: test_two_nodes_on_loopback_run_rl_and_resume_after_sigkill
        run = tmp_path / f"run-{first}-{again}"
        args = _sft(tiny_model_dir, synth_dir, run, 4, "parallel=fsdp")
        proc = _launch(args, first)
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "step-2").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        kill_tree(proc.pid)  # the launcher and its ranks (each rank runs in a session of its own)
        proc.wait()
        assert not (run / "checkpoints" / "step-4").exists()  # it really died mid-run
        out = _finish(_launch(args if again == 2 else [*args[:-1], "parallel=none"], again))
        assert "resumed from" in out and "at step 2" in out  # from the checkpoint the killed run left
        assert _close(_weights(run, 4), ref) < 1e-4
        assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_fsdp_mixed_precision(tiny_model_dir, synth_dir, tmp_path):
    """dtype bfloat16 under FSDP2 (its MixedPrecisionPolicy: bf16 compute, fp32 reduction and master weights): the
    losses of the 1-process autocast run within bf16 tolerance, an fp32 checkpoint."""
    procs = [_launch(_sft(tiny_model_dir, synth_dir, tmp_path / "one", 2, "dtype=bfloat16"), 1),
             _launch(_sft(tiny_model_dir, synth_dir, tmp_path / "two", 2, "dtype=bfloat16", "parallel=fsdp"), 2)]
    for proc in procs:  # independent runs, side by side
        _finish(proc)
    l1 = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    l2 = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(l2) == 2 and l1 == pytest.approx(l2, rel=2e-2)
    w = _weights(tmp_path / "two", 2)
    assert {v.dtype for v in w.values()} == {torch.float32}
    assert _close(_weights(tmp_path / "one", 2), w) < 5e-3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_on_loopback_run_rl_and_resume_after_sigkill(tiny_model_dir, synth_dir, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1` twice with a c10d rendezvous on loopback (two "nodes" sharing `out`,
    as the README asks): 5 FSDP2 GRPO steps, killed after the step-2 checkpoint, then the same two commands resume
    and finish with the weights of a 1-process run."""
    from vlrl import recipes_dir

    data = synth_dir / "counting" / "train.jsonl"

    def rl_args(out: Path) -> list[str]:
        return ["rl", "--config", str(recipes_dir() / "tiny-grpo.yaml"), f"model={tiny_model_dir}", f"data=[{data}]",
                f"replay.data=[{data}]", "validation.data=[]", f"out={out}", "max_steps=5", "rollout.batch_size=2",
                "rollout.group_size=4", "rollout.max_new_tokens=8", "logging.save_every=2",
                "logging.keep_checkpoints=10", "threads=1", "parallel=fsdp"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def nodes(out: Path) -> list[subprocess.Popen]:
        port = _free_port()
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                  "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=vlrl-test",
                                  "-m", "vlrl.cli", *rl_args(out)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]

    # the 1-process reference runs beside the first launch of the nodes (independent runs, each mostly importing)
    one = subprocess.Popen([sys.executable, "-m", "vlrl.cli", *rl_args(tmp_path / "one")], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = tmp_path / "two"
    first = nodes(run)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step-2").exists():
        assert all(p.poll() is None for p in first) and time.monotonic() < deadline, \
            "".join(p.stdout.read() for p in first if p.stdout and p.poll() is not None)
        time.sleep(0.05)
    for p in first:
        kill_tree(p.pid)  # the launcher and its rank (in a session of its own)
        p.wait()
    assert not (run / "checkpoints" / "step-5").exists()
    outs = [_finish(p) for p in nodes(run)]
    _finish(one)
    assert any("resumed from" in out and "at step 2" in out for out in outs)
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert _close(_weights(tmp_path / "one", 5), _weights(run, 5)) < 1e-4
