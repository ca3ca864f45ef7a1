"""Processes seen through /proc, for tests that check what a run leaves behind (worker processes of a killed
trainer or server)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry.name)] = cmd
    return out


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, the deepest first: torchrun starts each rank in a session of its
    own, so killing the launcher (or its process group) leaves the ranks running."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        below = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= below
        grew = bool(below)
    for p in sorted(tree, key=lambda p: p == pid):  # the ranks first, so none goes on past the launcher
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
