"""What every fuzz target shares: its hypothesis settings (a fixed seed and a small budget in `make test`; a random
seed and `VLRL_FUZZ_SCALE` times that budget in `make fuzz`, so that slow targets stay proportionally small), the
per-target case counter that the summary at the end of the run prints (tests/fuzz/conftest.py), and `limits`, the
time and memory bounds one case must hold.

    @fuzz_settings()
    @given(st.text())
    def test_parse(text):
        with limits("rewards.parse_box"):
            parse_box(text)
"""

from __future__ import annotations

import os
import signal
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, settings

COUNTS: Counter[str] = Counter()  # cases run per target, this session
CAMPAIGN = "VLRL_FUZZ_SCALE" in os.environ  # `make fuzz`: long, random seed; else `make test`: short, fixed seed


def fuzz_settings(examples: int = 100, **kw: Any) -> settings:
    """`examples` cases under `make test` (derandomized: the same cases on every run, so a failure reproduces);
    `VLRL_FUZZ_SCALE` x `examples` cases from a random seed under `make fuzz`. No deadline: a slow case on a loaded
    machine is not a failure; `limits` catches the ones that hang."""
    n = int(float(os.environ["VLRL_FUZZ_SCALE"]) * examples) if CAMPAIGN else examples
    return settings(max_examples=n, deadline=None, derandomize=not CAMPAIGN, database=None,
                    suppress_health_check=list(HealthCheck), **kw)  # fmt: skip


class Exceeded(AssertionError):
    """A case broke its time or memory bound."""


@contextmanager
def limits(target: str, seconds: float = 20.0, megabytes: float = 256.0) -> Iterator[None]:
    """Count one case of `target`; fail it if it runs longer than `seconds` (a hang: the bound is far above any
    honest case, even on a loaded machine, so it cannot flake) or allocates more than `megabytes` of Python
    memory at its peak (tracemalloc)."""
    COUNTS[target] += 1

    def _timeout(signum: int, frame: Any) -> None:
        raise Exceeded(f"{target}: one case ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        if peak > megabytes:
            raise Exceeded(f"{target}: one case allocated {peak:.0f} MB (bound {megabytes:.0f} MB)")
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
