"""Fixtures of the vLLM engine tests (`make test-vllm`): the vLLM environment's Python.

These tests need the environment that `scripts/vllm-env.sh` builds (`make vllm-env`). `make test` does not run this
folder; `make test-vllm` does, with VLRL_REQUIRE_VLLM=1, so that a missing environment fails there instead of
skipping. Elsewhere (a plain `pytest tests/with_vllm`) a missing environment skips the tests and says why.
`start_worker` starts workers by hand, as server mode expects them."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """Path of the vLLM environment's Python: $VLRL_VLLM_PYTHON, else the checkout's .venv-vllm."""
    path = Path(os.environ.get("VLRL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not path.exists():
        reason = f"no vLLM environment at {path} (make vllm-env)"
        if os.environ.get("VLRL_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return str(path)


class ServerWorker:
    """A vLLM worker started by hand, as server mode expects one: its stdout read until the ready line, then
    drained by a thread (so the pipe never fills) into `lines`; `stop` terminates it."""

    def __init__(self, python: str, model_dir: Path, timeout: float = 900.0) -> None:
        from vlrl.rollout.vllm_engine import READY, WORKER

        self.lines: list[str] = []
        self.proc = subprocess.Popen([python, str(WORKER), "--model", str(model_dir), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        ready = threading.Event()
        port: list[int] = []
        stdout = self.proc.stdout
        assert stdout is not None

        def drain() -> None:
            for line in stdout:
                self.lines.append(line)
                if line.startswith(READY) and not port:
                    port.append(int(line.split()[1]))
                    ready.set()
            ready.set()  # it exited

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or not port:
            self.stop()
            pytest.fail(f"the vLLM worker on {model_dir} did not start:\n{''.join(self.lines[-30:])}")
        self.url = f"http://127.0.0.1:{port[0]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def start_worker(vllm_python: str):
    """`start_worker(model_dir) -> ServerWorker`; every worker started through it is stopped at the session's end
    (a test may stop its own earlier)."""
    started: list[ServerWorker] = []

    def start(model_dir: Path) -> ServerWorker:
        started.append(ServerWorker(vllm_python, model_dir))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()
