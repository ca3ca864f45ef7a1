"""Helpers of the serve tests: `vlrl serve` on the tiny model in a subprocess on 127.0.0.1 (small limits so
the tests stay fast), PNG bytes and data URLs."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

STARTUP_SECONDS = 90.0
LIMIT_ARGS = ["--max-body-bytes", "262144", "--max-image-pixels", "1000000", "--max-tokens-cap", "64",
              "--max-images", "2", "--max-generation-seconds", "30", "--log-level", "warning"]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, log_path: Path, extra: list[str] | None = None, *,
                 startup_seconds: float = STARTUP_SECONDS, env: dict[str, str] | None = None) -> Served:
    """Start `vlrl serve` (with `env` added to the environment) and wait (bounded) until /health answers; fail
    with the server's log otherwise."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-m", "vlrl.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", *LIMIT_ARGS, *(extra or [])]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    served = Served(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + startup_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlrl serve exited with {proc.returncode}:\n{served.log()}")
        try:
            if httpx.get(served.url + "/health", timeout=1.0).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    served.stop()
    pytest.fail(f"vlrl serve did not answer /health within {startup_seconds}s:\n{served.log()}")


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")
