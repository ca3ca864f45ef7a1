"""Pass statistics of one item from the rewards of its N sampled completions (pure functions), shared by
`vlrl eval` (pass@1, pass@N per task) and `vlrl curate` (the difficulty band, `vlrl.curate.filter`).

Per item (None = no reward could score that completion):

    mean        mean reward over the scored completions (None when none was scored)
    min, max    over the scored completions
    pass_rate   fraction of the N completions whose reward >= `threshold` (unscored = not passed); with the
                `accuracy` reward and threshold 0.5 this is the fraction answered right (the unbiased pass@1)
    pass@1      1.0 if the greedy completion passes (`pass1="greedy"`), or the first sample (`pass1="first"`)
    pass@N      1.0 if any of the N completions passes
    gap         pass@N - pass@1: Innovator-VL's discrepancy between what the model can reach by sampling and
                what it answers by default (large gap = learnable by RL)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PASS1_MODES = ("greedy", "first")


@dataclass(frozen=True)
class ItemStats:
    """Pass statistics of one item (see the module docstring)."""

    n: int  # completions sampled
    n_scored: int  # completions some reward could score
    n_pass: int  # completions whose reward >= threshold
    mean: float | None
    min: float | None
    max: float | None
    pass_rate: float
    pass_at_1: float
    pass_at_n: float
    gap: float
    pass1: str  # "greedy" or "first": what pass@1 was read from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passes(reward: float | None, threshold: float) -> bool:
    return reward is not None and reward >= threshold


def item_stats(rewards: Sequence[float | None], *, threshold: float = 0.5, pass1: str = "greedy",
               greedy: float | None = None) -> ItemStats:
    """Statistics of one item from its N sample rewards and (pass1="greedy") its greedy completion's reward."""
    if pass1 not in PASS1_MODES:
        raise ValueError(f"unknown pass1 mode {pass1!r}; valid: {', '.join(PASS1_MODES)}")
    if not rewards:
        raise ValueError("an item needs at least one sampled reward")
    scored = [float(r) for r in rewards if r is not None]
    n_pass = sum(passes(r, threshold) for r in rewards)
    first = greedy if pass1 == "greedy" else rewards[0]
    at_1 = float(passes(first, threshold))
    at_n = float(n_pass > 0)
    return ItemStats(
        n=len(rewards), n_scored=len(scored), n_pass=n_pass,
        mean=sum(scored) / len(scored) if scored else None,
        min=min(scored) if scored else None, max=max(scored) if scored else None,
        pass_rate=n_pass / len(rewards), pass_at_1=at_1, pass_at_n=at_n, gap=at_n - at_1, pass1=pass1,
    )


def mean_of(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
