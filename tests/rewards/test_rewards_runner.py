"""RewardRunner: exceptions, time-outs, dying workers and memory blow-ups give None and are counted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vlrl.data.sample import Sample
from vlrl.rewards.registry import RewardSpec, combine, get_reward
from vlrl.rewards.runner import RewardRunner

TIMEOUT = 1.5


def hostile_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
    """1.0 per item, unless the completion asks to raise, hang, die or allocate without bound."""
    out: list[float | None] = []
    for c in completions:
        if c == "raise":
            raise RuntimeError("boom")
        if c == "sleep":
            time.sleep(60)
        if c == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if c == "oom":
            blocks = [bytearray(256 * 1024 * 1024) for _ in range(64)]  # 16 GB, touched below
            for block in blocks:
                block[::4096] = b"x" * len(block[::4096])
        if c == "bad":
            return [1.0] * (len(completions) + 1)  # wrong length: malformed result
        out.append(1.0)
    return out


def pid_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
    return [float(os.getpid())] * len(completions)


def sliced_reward(
    completions: list[str], samples: list[Sample], *, lengths: list[int], **_: Any
) -> list[float | None]:
    return [float(n) for n in lengths]


def _samples(n: int) -> list[Sample]:
    return [Sample(id=str(i), images=[], messages=[], answer="3", problem_type="numerical") for i in range(n)]


@pytest.fixture(scope="module")
def pool() -> Iterator[RewardRunner]:
    runner = RewardRunner(workers=2, timeout=TIMEOUT, chunk_size=4, fast_path=False, memory_limit_mb=1024)
    yield runner
    runner.close()


@pytest.mark.slow
def test_pool_isolates_raise_and_hang(pool: RewardRunner) -> None:
    completions = ["ok"] * 12
    completions[2], completions[9] = "raise", "sleep"
    start = time.perf_counter()
    result = pool.run(hostile_reward, completions, _samples(12), name="hostile")
    elapsed = time.perf_counter() - start
    expected = [1.0] * 12
    expected[2] = expected[9] = None
    assert result.values == expected
    assert (result.errors, result.timeouts) == (1, 1)
    assert elapsed < 55  # a hang bound: only waiting out the 60 s sleep comes near it (timeouts == 1 shows the kill)
    assert pool.stats["hostile"].errors >= 1 and pool.stats["hostile"].timeouts >= 1
    # the pool recovered: killed workers were replaced
    again = pool.run(hostile_reward, ["ok"] * 5, _samples(5), name="hostile")
    assert again.values == [1.0] * 5


@pytest.mark.slow
def test_pool_survives_dying_worker_memory_blowup_and_malformed_results(pool: RewardRunner) -> None:
    completions = ["ok", "die", "ok", "oom", "ok", "bad", "ok"]
    result = pool.run(hostile_reward, completions, _samples(7), name="hostile2")
    assert result.values == [1.0, None, 1.0, None, 1.0, None, 1.0]
    assert result.errors + result.timeouts == 3


@pytest.mark.slow
def test_pool_runs_real_rewards_and_slices_list_kwargs(pool: RewardRunner) -> None:
    samples = _samples(10)
    completions = [f"<answer>{i % 4}</answer>" for i in range(10)]
    result = pool.run(get_reward("accuracy"), completions, samples, name="accuracy")
    assert result.values == [1.0 if i % 4 == 3 else 0.0 for i in range(10)]
    sliced = pool.run(sliced_reward, completions, samples, {"lengths": list(range(10))}, name="sliced")
    assert sliced.values == [float(i) for i in range(10)]
    assert pool.run(pid_reward, ["x"], _samples(1)).values[0] != float(os.getpid())  # ran in a worker
    total, per_reward, metrics = combine(
        [RewardSpec("accuracy"), RewardSpec("format")], completions, samples, runner=pool
    )
    assert per_reward["accuracy"] == result.values and metrics["reward/format/mean"] == 0.0


def test_fast_path_runs_cheap_rewards_in_process() -> None:
    with RewardRunner(workers=1, timeout=TIMEOUT) as runner:
        result = runner.run(pid_reward, ["x", "y"], _samples(2), cheap=True)
        assert result.values == [float(os.getpid())] * 2
        assert runner._pool == []  # no worker was started for a cheap reward


def test_in_process_runner_counts_exceptions_per_item() -> None:
    runner = RewardRunner(workers=0, chunk_size=3)
    completions = ["ok", "raise", "ok", "ok", "bad", "ok", "ok"]
    result = runner.run(hostile_reward, completions, _samples(7), name="sync")
    assert result.values == [1.0, None, 1.0, 1.0, None, 1.0, 1.0]
    assert (result.errors, result.timeouts) == (2, 0)
    assert runner.stats["sync"].errors == 2 and runner.stats["sync"].items == 7


def test_unpicklable_reward_runs_in_process_and_validation() -> None:
    with RewardRunner(workers=1, timeout=TIMEOUT) as runner:
        result = runner.run(lambda c, s: [0.5] * len(c), ["a", "b"], _samples(2))
        assert result.values == [0.5, 0.5]
    with pytest.raises(ValueError, match="fork"):
        RewardRunner(workers=1, start_method="fork")
    with pytest.raises(ValueError, match="samples"):
        RewardRunner().run(hostile_reward, ["a"], [])
    assert RewardRunner().run(hostile_reward, [], []).values == []


def numpy_reward(completions: list[str], samples: list[Sample], **_: Any) -> Any:
    import numpy as np

    return np.full(len(completions), 0.25, dtype=np.float32)


def test_numpy_results_accepted_and_nan_rejected() -> None:
    runner = RewardRunner()
    assert runner.run(numpy_reward, ["a", "b"], _samples(2)).values == [0.25, 0.25]
    result = runner.run(lambda c, s: [float("nan")] * len(c), ["a"], _samples(1))
    assert result.values == [None] and result.errors == 1


def test_batch_level_reward_is_not_retried_per_item() -> None:
    calls: list[int] = []

    def batch_reward(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
        calls.append(len(completions))
        if "raise" in completions:
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    runner = RewardRunner(chunk_size=2)
    result = runner.run(batch_reward, ["a", "raise", "b", "c", "d"], _samples(5), chunkable=False)
    assert result.values == [None] * 5 and result.errors == 5 and calls == [5]
    calls.clear()
    result = runner.run(batch_reward, ["a", "raise", "b", "c", "d"], _samples(5))
    assert result.values == [1.0, None, 1.0, 1.0, 1.0] and calls == [2, 2, 1, 1, 1]
