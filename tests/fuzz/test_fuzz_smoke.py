"""The fuzzing harness itself: a case that hangs or allocates past its bound fails; counts are kept."""

from __future__ import annotations

import time

import pytest
from fuzzing import COUNTS, Exceeded, limits


def test_limits_catch_a_hang_and_a_blowup():
    with pytest.raises(Exceeded, match="over 0.2 s"), limits("smoke", seconds=0.2):
        time.sleep(5)
    with pytest.raises(Exceeded, match="allocated"), limits("smoke", megabytes=1):
        _ = [0] * 1_000_000
    with limits("smoke"):
        pass
    assert COUNTS["smoke"] >= 3
