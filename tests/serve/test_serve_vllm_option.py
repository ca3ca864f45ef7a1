"""`vlrl serve --engine vllm` without vLLM: its options are checked before the model loads, a worker that cannot
start is `error: ...` (exit 2) before serving, and the server stops its colocated worker when it exits on SIGTERM
(a stand-in worker, a script that says it is ready and waits for its stdin to close, takes vLLM's place)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from proc_tree import alive, children
from serve_helpers import free_port, start_server

from vlrl.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_vllm_options_are_checked_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tmp_path / "no-model")  # never read: each case is refused first
    port = str(free_port())
    cases = [(["--engine", "vllm", "--vllm-python", str(tmp_path / "no-python")], "make vllm-env"),
             (["--vllm-url", "http://127.0.0.1:8100"], "need --engine vllm"),
             (["--vllm-python", "/usr/bin/python3"], "need --engine vllm"),
             (["--engine", "vllm", "--vllm-url", "ftp://127.0.0.1:8100"], "--vllm-url must be http"),
             (["--engine", "sglang"], "--engine")]
    for extra, expected in cases:
        code, _, err = _run(["serve", "--model", model, "--port", port, *extra], capsys)
        assert code == 2 and "error:" in err and expected in err, (extra, err)


def test_a_vllm_worker_that_cannot_start_is_an_error_before_serving(tiny_model_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = _run(["serve", "--model", str(tiny_model_dir), "--port", str(port), "--engine", "vllm",
                           "--vllm-python", "/bin/false"], capsys)  # a "Python" that exits at once with code 1
    assert code == 2 and err.startswith("error: the vLLM worker exited with code 1 while starting")
    assert "serving" not in out and "Traceback" not in err
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):  # nothing listens on the port any more
        client.get(f"http://127.0.0.1:{port}/health", timeout=2.0)




@pytest.mark.slow
def test_sigterm_stops_the_colocated_worker_and_removes_its_model_copy(tiny_model_dir: Path, tmp_path: Path) -> None:
    # run as `fake-python <worker> --model DIR ...`: ready at once, then (as the real worker) gone when its stdin
    # closes
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho VLRL_WORKER_READY 1\nexec cat > /dev/null\n")
    fake.chmod(0o755)
    tmp = tmp_path / "tmp"  # the server's temporary folders, where the engine writes the worker's model copy
    tmp.mkdir()
    served = start_server(tiny_model_dir, tmp_path / "server.log", ["--engine", "vllm", "--vllm-python", str(fake)],
                          env={"TMPDIR": str(tmp)})
    workers = [pid for pid, cmd in children(served.proc.pid).items() if cmd.startswith("cat")]
    try:
        assert len(workers) == 1, children(served.proc.pid)
        assert [(p / "model" / "config.json").is_file() for p in tmp.glob("vlrl-vllm-*")] == [True]
        served.proc.send_signal(signal.SIGTERM)
        code = served.proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(workers[0]), f"the worker outlived the server (exit {code}):\n{served.log()}"
        assert not list(tmp.glob("vlrl-vllm-*"))
        assert code == 128 + signal.SIGTERM  # it exited (finally blocks ran) rather than being killed by the signal
    finally:
        served.stop()
        for pid in workers:  # the stand-in this test started, if the server left it behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
