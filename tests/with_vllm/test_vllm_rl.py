"""RL and eval with the `vllm` rollout engine on the tiny model (`make test-vllm`): a GRPO run samples with a
colocated vLLM worker, is SIGKILLed after a checkpoint, and the same command resumes from that checkpoint to its
last step, leaving no worker behind; `vlrl eval` with engine vllm gives the hf engine's greedy predictions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from proc_tree import alive, children
from safetensors.torch import load_file

from vlrl.eval.evaluate import EvalConfig, run_eval
from vlrl.rollout.vllm_engine import VLLMConfig
from vlrl.train.logging import read_metrics

pytestmark = pytest.mark.slow

STEPS = 20
WORKER_MARK = "vllm_worker"  # in a worker's command line: the engine runs src/vlrl/rollout/vllm_worker by path

# a reward that varies between the untrained tiny model's completions, so that every step has a gradient
REWARDS = '''
def distinct_chars(completions, samples):
    return [len(set(c)) / max(1, len(c)) for c in completions]
'''




def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids of `pids` still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _end_orphans(workers: dict[int, str], timeout: float) -> set[int]:
    """Clean up after a SIGKILLed trainer: wait up to `timeout` s for its `workers` (pid -> command line) to end by
    themselves (their stdin closed with the trainer), SIGKILL those still running and delete the temporary model
    folders (`vlrl-vllm-*`) the dead trainers left. Returns the pids that had to be killed."""
    left = _wait_gone(set(workers), timeout)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    _wait_gone(left, 30)
    for cmd in workers.values():
        words = cmd.split()
        folder = Path(words[words.index("--model") + 1]).parent if "--model" in words else None
        if folder is not None and folder.name.startswith("vlrl-vllm-"):
            shutil.rmtree(folder, ignore_errors=True)
    return left


def _rl_args(model: Path, data: Path, out: Path, rewards: Path, python: str) -> list[str]:
    """`vlrl rl` overrides: 20 steps of GRPO from the untrained tiny model on counting, B=2 x G=4 completions of at
    most 8 tokens sampled by a colocated vLLM worker, a checkpoint every 5 steps."""
    over: dict[str, object] = {
        "model": model, "data": f"[{data / 'counting' / 'train.jsonl'}]", "out": out, "max_steps": STEPS,
        "rewards": f"[{{name: {rewards}:distinct_chars}}]", "threads": 1, "micro_batch_size": 8,
        "rollout.engine": "vllm", "rollout.vllm.python": python, "rollout.batch_size": 2, "rollout.group_size": 4,
        "rollout.max_new_tokens": 8, "optim.lr": 1e-3, "logging.save_every": 5, "logging.keep_checkpoints": 0,
        "logging.log_every": 1,
    }  # fmt: skip
    return ["rl", *[f"{k}={v}" for k, v in over.items()]]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True)


def _workers(pid: int) -> dict[int, str]:
    """The vLLM workers `pid` runs: pid -> command line."""
    return {child: cmd for child, cmd in children(pid).items() if WORKER_MARK in cmd}


def _workers_until(proc: subprocess.Popen, done: Callable[[], bool], timeout: float) -> dict[int, str]:
    """Poll `proc` until `done()` or it exits (`timeout`: a hang detector); returns the vLLM workers it started."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while not done() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run hung"
        seen.update(_workers(proc.pid))
        time.sleep(0.2)
    return seen


def test_grpo_with_vllm_trains_then_sigkill_and_rerun_resumes(tiny_model_dir, synth_dir, vllm_python, tmp_path):
    rewards = tmp_path / "mine.py"
    rewards.write_text(textwrap.dedent(REWARDS))
    out = tmp_path / "run"
    args = _rl_args(tiny_model_dir, synth_dir, out, rewards, vllm_python)
    first = out / "checkpoints" / "step-5"

    proc = _start(args, tmp_path / "killed.log")
    workers = _workers_until(proc, first.exists, timeout=1800)
    assert first.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    workers.update(_workers(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) == 1  # the run had its colocated worker
    assert not (out / "checkpoints" / f"step-{STEPS}").exists()  # it really died mid-run
    assert not _end_orphans(workers, timeout=60), "the vLLM worker outlived its SIGKILLed trainer"

    again = _start(args, tmp_path / "rerun.log")
    workers = _workers_until(again, lambda: False, timeout=1800)
    log = (tmp_path / "rerun.log").read_text()
    assert again.returncode == 0, log[-3000:]
    assert len(workers) == 1
    assert not _wait_gone(set(workers), timeout=30)  # the run stopped its worker when it ended
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and int(resumed[1]) >= 5, log[-3000:]  # from a checkpoint, not from step 0

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "checkpoints" / f"step-{STEPS}"
                                                                               / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(before)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # every step once, across the kill
    for m in metrics:
        assert isinstance(m["reward/mean"], float) and isinstance(m["reward/distinct_chars"], float)
        assert m["rollout/logp_diff"] < 1e-3  # vLLM's sampling log-probs are the trainer's (after every sync)


WORKER_PID = """
import sys
from vlrl.models.loading import load_model_and_processor
from vlrl.rollout.vllm_engine import VLLMConfig, VLLMEngine

model, processor = load_model_and_processor(sys.argv[1])
engine = VLLMEngine(model, processor, config=VLLMConfig(python=sys.argv[2]))
print("WORKER", engine.worker.proc.pid, engine.worker.dir, flush=True)
sys.stdin.read()  # until killed
"""


def test_worker_dies_with_its_trainer(tiny_model_dir, vllm_python):
    proc = subprocess.Popen([sys.executable, "-c", WORKER_PID, str(tiny_model_dir), vllm_python],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line
        worker = int(line.split()[1])
        workers = _workers(proc.pid)
        assert list(workers) == [worker]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not _end_orphans(workers, timeout=60), "the vLLM worker outlived its SIGKILLed trainer"
        assert not Path(line.split()[2]).exists()  # nor did the trainer's copy of the model it had made
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def test_eval_with_vllm_gives_the_hf_engines_greedy_predictions(varied_model_dir, synth_dir, vllm_python, tmp_path):
    data = [str(synth_dir / task / "test.jsonl") for task in ("counting", "chart", "compare", "grounding")]
    results = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.json"
        cfg = EvalConfig(model=str(varied_model_dir), data=data, out=str(out), limit=4, max_new_tokens=12,
                         batch_size=8, engine=engine, vllm=VLLMConfig(python=vllm_python))
        run_eval(cfg)
        results[engine] = [json.loads(line) for line in out.with_name(f"{engine}.predictions.jsonl").open()]
    hf, vllm = results["hf"], results["vllm"]
    assert len(hf) == 16 and [p["id"] for p in vllm] == [p["id"] for p in hf]
    assert len({p["completion"] for p in hf}) > 4  # the items get different answers: a real comparison
    assert [p["completion"] for p in vllm] == [p["completion"] for p in hf]
    assert [p["correct"] for p in vllm] == [p["correct"] for p in hf]
