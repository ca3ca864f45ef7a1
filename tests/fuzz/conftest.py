"""Prints the fuzz cases run per target at the end of the session (`make test` and `make fuzz`)."""

from __future__ import annotations

from typing import Any

from fuzzing import CAMPAIGN, COUNTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    tr = terminalreporter
    tr.section("fuzz cases" + (" (campaign)" if CAMPAIGN else ""))
    for target, n in sorted(COUNTS.items()):
        tr.write_line(f"{target:<48} {n:>9,}")
    failed = len(tr.stats.get("failed", []))
    tr.write_line(f"{'total':<48} {sum(COUNTS.values()):>9,}   targets {len(COUNTS)}   failed tests {failed}")
