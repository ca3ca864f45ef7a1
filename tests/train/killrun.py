"""Kill a training command at a chosen point, for resume tests: `run_killed` runs `vlrl <args>` in a subprocess
whose wrapper script (`KILLER`, test-side only: the library has no hooks) replaces one function so that its
`at`-th call SIGKILLs the process, before or after the real call or halfway through a file write;
`kill_when_exists` kills a running one once a path appears (a checkpoint folder, say)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# point -> (module, attribute, when): when is "before" or "after" the real call, or "torn" (write half of what
# the call would write to its file, then die)
POINTS = {
    "rollout": ("vlrl.train.rl", "collect", "before"),
    "reward": ("vlrl.train.rl_rollout", "score_groups", "before"),
    "update": ("vlrl.train.rl", "policy_update", "after"),
    "checkpoint": ("torch", "save", "torn"),
    "metrics": ("vlrl.train.logging", "MetricsLogger.log", "torn"),
}

KILLER = r'''
import importlib, json, os, signal, sys

module_name, attr, when, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = 0


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def torn(args):
    """Half of what the call would write: torch.save's file, or a metrics line."""
    if name == "save":
        with open(args[1], "wb") as f:
            f.write(b"PK\x03\x04 half a trainer state")
    elif args[0].path.name == "metrics.jsonl":
        with open(args[0].path, "a") as f:
            f.write(json.dumps(args[1])[:20])
    else:
        return False
    return True


def wrapped(*args, **kw):
    global calls
    counts = name != "log" or args[0].path.name == "metrics.jsonl"  # MetricsLogger.log: metrics lines only
    calls += counts
    if counts and calls == at:
        if when == "before" or (when == "torn" and torn(args)):
            die()
        if when == "after":
            out = real(*args, **kw)
            die()
    return real(*args, **kw)


setattr(owner, name, wrapped)
from vlrl.cli import main

sys.exit(main(sys.argv[5:]))
'''


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_killed(args: list[str], point: str, at: int, timeout: float = 600) -> str:
    """Run `vlrl <args>` until the `at`-th call at `point` (`POINTS`) kills it; returns its output. Fails if the
    process ends any other way (the point was never reached, or the command failed)."""
    module, attr, when = POINTS[point]
    proc = subprocess.run([sys.executable, "-c", KILLER, module, attr, when, str(at), *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed at {point}:\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def kill_when_exists(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` once `path` exists (failing if it ends first or `timeout` s pass: a hang detector)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"run ended before {path} appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
