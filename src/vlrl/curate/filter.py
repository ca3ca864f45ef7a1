"""The band filter over items (pure functions), on the per-item statistics of `vlrl.eval.passk` (mean, min,
max, pass_rate, pass@1, pass@N, gap: defined there, shared with `vlrl eval`).

`keep` applies the band of LLaVA-OneVision-1.5-RL (it keeps 0 < mean < 0.6 for most tasks): LOW < mean < HIGH
(an open interval) and min < max, i.e. the mean lies strictly between the smallest and the largest reward, so
the group has a GRPO signal. `select` then optionally ranks the kept items by gap (largest first, input order
on ties) and truncates to `max_keep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlrl.eval.passk import PASS1_MODES, ItemStats, item_stats, mean_of, passes

__all__ = ["PASS1_MODES", "ItemStats", "format_report", "item_stats", "keep", "mean_of", "parse_band", "pass_histogram",
           "passes", "select", "summarize"]


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
