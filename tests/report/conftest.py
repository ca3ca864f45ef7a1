"""Headless Chromium for the report tests: the distribution's `chromium`, installed here when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_TIMEOUT = 1800  # s: the package and its dependencies on a slow mirror


def _install_chromium() -> str:
    """Install Debian's `chromium` with apt-get (as root, or through password-less sudo); '' on success, else
    why it could not be installed."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this system to install the distribution's chromium package"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode != 0:
            return "not root and no password-less sudo: cannot apt-get install chromium"
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = ""
    # a fresh container has no package lists: update once and retry when the first attempt fails
    for cmd in ([apt, "install", "-y", "chromium"], [apt, "update"], [apt, "install", "-y", "chromium"]):
        try:
            done = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out after {INSTALL_TIMEOUT}s"
        if done.returncode == 0 and "install" in cmd and shutil.which("chromium"):
            return ""
        why = f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-400:]}"
    return why


class Chromium:
    """`run(page, *flags)`: Chromium headless on the local file `page`, its stdout. Scripts run for up to 20 s
    of virtual time, so plotly has drawn before the DOM is dumped or the screenshot taken."""

    def __init__(self, exe: str, profile: Path):
        self.exe = exe
        self.profile = profile  # its own profile folder: nothing read from or left in the user's

    def run(self, page: Path, *flags: str, timeout: float = 180) -> str:
        cmd = [self.exe, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-sandbox",  # tests often run as root in containers, where Chromium's sandbox will not start
               f"--user-data-dir={self.profile}", "--no-first-run", "--window-size=1280,2000",
               "--virtual-time-budget=20000", *flags, page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Chromium:
    """Headless Chromium; the test is skipped, saying why, only where it cannot be installed."""
    exe = shutil.which("chromium")
    if exe is None:
        why = _install_chromium()
        exe = shutil.which("chromium")
        if exe is None:
            reason = f"headless Chromium unavailable: {why}"
            print(reason)
            pytest.skip(reason)
    return Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
