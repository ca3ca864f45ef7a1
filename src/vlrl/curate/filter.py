"""Difficulty statistics of one item from its sampled rewards, and the band filter over items (pure functions).

Per item, from the rewards of its N sampled completions (None = no reward could score it):

    mean        mean reward over the scored completions (None when none was scored)
    min, max    over the scored completions
    pass_rate   fraction of the N completions whose reward >= `threshold` (unscored = not passed); with the
                `accuracy` reward and threshold 0.5 this is the fraction answered right (the unbiased pass@1)
    pass@1      1.0 if the greedy completion passes (`pass1="greedy"`), or the first sample (`pass1="first"`)
    pass@N      1.0 if any of the N completions passes
    gap         pass@N - pass@1: Innovator-VL's discrepancy between what the model can reach by sampling and
                what it answers by default (large gap = learnable by RL)

`keep` applies the band of LLaVA-OneVision-1.5-RL (it keeps 0 < mean < 0.6 for most tasks): LOW < mean < HIGH
(an open interval) and min < max, i.e. the mean lies strictly between the smallest and the largest reward, so
the group has a GRPO signal. `select` then optionally ranks the kept items by gap (largest first, input order
on ties) and truncates to `max_keep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PASS1_MODES = ("greedy", "first")


@dataclass(frozen=True)
class ItemStats:
    """Difficulty statistics of one item (see the module docstring)."""

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


def parse_band(text: str | Sequence[float]) -> tuple[float, float]:
    """"LOW,HIGH" (or a pair) -> (low, high) with low < high."""
    parts = [p for p in text.split(",")] if isinstance(text, str) else list(text)
    if len(parts) != 2:
        raise ValueError(f"band must be LOW,HIGH (two numbers), got {text!r}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        raise ValueError(f"band must be LOW,HIGH (two numbers), got {text!r}") from None
    if not low < high:
        raise ValueError(f"band: LOW must be < HIGH, got {low}, {high}")
    return low, high


def keep(stats: ItemStats, low: float, high: float) -> bool:
    """LOW < mean < HIGH and min < max (the rewards are not all equal)."""
    if stats.mean is None or stats.min is None or stats.max is None:
        return False
    return low < stats.mean < high and stats.min < stats.max


def select(items: Sequence[tuple[str, ItemStats]], band: tuple[float, float], *, rank_by_gap: bool = False,
           max_keep: int | None = None) -> list[str]:
    """Ids of the kept items: in input order, or by gap (largest first, input order on ties); at most max_keep."""
    if max_keep is not None and max_keep < 0:
        raise ValueError(f"max_keep must be >= 0, got {max_keep}")
    kept = [(pos, key, st) for pos, (key, st) in enumerate(items) if keep(st, *band)]
    if rank_by_gap:
        kept.sort(key=lambda x: (-x[2].gap, x[0]))
    ids = [key for _, key, _ in kept]
    return ids if max_keep is None else ids[:max_keep]


def pass_histogram(stats: Sequence[ItemStats]) -> dict[str, int]:
    """How many items had k of their N completions pass, for k = 0 .. N: {"k/N": count}. Items with different
    N (a resumed run with another N is refused, so this is rare) are keyed by their own N."""
    sizes = sorted({s.n for s in stats})
    out: dict[str, int] = {f"{k}/{n}": 0 for n in sizes for k in range(n + 1)}
    for s in stats:
        out[f"{s.n_pass}/{s.n}"] += 1
    return out


def mean_of(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(stats: Sequence[ItemStats], kept: int) -> dict[str, Any]:
    """Totals over items: kept fraction, mean pass rate / pass@1 / pass@N / gap, the pass-rate histogram."""
    n = len(stats)
    return {
        "n_items": n, "n_kept": kept, "kept_fraction": kept / n if n else 0.0,
        "n_unscored": sum(s.mean is None for s in stats),
        "mean_reward": mean_of([s.mean for s in stats if s.mean is not None]),
        "mean_pass_rate": mean_of([s.pass_rate for s in stats]),
        "pass_at_1": mean_of([s.pass_at_1 for s in stats]),
        "pass_at_n": mean_of([s.pass_at_n for s in stats]),
        "mean_gap": mean_of([s.gap for s in stats]),
        "all_pass": sum(s.n_pass == s.n for s in stats), "none_pass": sum(s.n_pass == 0 for s in stats),
        "pass_histogram": pass_histogram(stats),
    }


def format_report(summary: dict[str, Any], width: int = 40) -> str:
    """The printed text of a report: totals, then one bar per pass count."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"items {summary['n_items']}  kept {summary['n_kept']} ({100 * summary['kept_fraction']:.1f}%)  "
        f"band {summary.get('band')}  unscored {summary['n_unscored']}",
        f"mean reward {num(summary['mean_reward'])}  pass rate {num(summary['mean_pass_rate'])}  "
        f"pass@1 {num(summary['pass_at_1'])}  pass@N {num(summary['pass_at_n'])}  gap {num(summary['mean_gap'])}",
        "pass-rate histogram (completions passed / N: items):",
    ]
    hist = summary["pass_histogram"]
    top = max(hist.values(), default=0)
    for key, count in hist.items():
        bar = "#" * (round(width * count / top) if top else 0)
        lines.append(f"  {key:>7} {count:>7}  {bar}")
    return "\n".join(lines)
