"""Which curve goes in which figure: every metric key of metrics.jsonl falls in exactly one stage group.

The groups follow what a reader checks when a run goes wrong (TRL's, verl's and EasyR1's dashboards show the
same families): is the reward rising, does validation follow, does the policy drift (KL, entropy), does it
write longer or shorter answers, how often is the ratio clipped, and where the seconds go. A key matching no
pattern goes to "Other", so a metric added to a loop later is still drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any

OTHER = "Other"
# (group title, fnmatch patterns), checked in this order: the first group with a matching pattern takes the key
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Rewards", ("reward/*", "mean_reward", "mean_pass_rate")),
    ("Accuracy", ("val_accuracy", "val_accuracy/*", "accuracy", "accuracy/*")),
    ("KL", ("kl", "kl/*", "approx_kl")),
    ("Entropy", ("entropy", "entropy/*")),
    ("Response length", ("completion/*",)),
    ("Clip fraction", ("clip_frac/*", "ratio/*")),
    ("Loss and optimizer", ("loss", "*/loss", "val_loss", "grad_norm", "lr", "updates", "target_tokens")),
    ("Advantages and sampling", ("adv/*", "frac_zero_std_groups", "dynamic/*", "rollout/*")),
    ("Trust-GRPO judge", ("trust/*",)),
    ("Seconds", ("time/*", "step_s", "elapsed_s")),
)
X_KEY = "step"  # the x axis of every curve, not a curve itself


def group_of(key: str) -> str:
    """The title of the group that draws metric `key`."""
    for title, patterns in GROUPS:
        if any(fnmatchcase(key, p) for p in patterns):
            return title
    return OTHER


def is_metric_value(v: Any) -> bool:
    """A value a curve can draw: a number (not a bool), or None (a non-finite value the logger wrote as null)."""
    return v is None or (isinstance(v, Real) and not isinstance(v, bool))


def metric_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every key with a drawable value in some record, in order of first appearance (`step` excluded)."""
    seen: dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            if k != X_KEY and k not in seen and is_metric_value(v):
                seen[k] = None
    return list(seen)


def group_metrics(keys: Iterable[str]) -> dict[str, list[str]]:
    """{group title: its keys sorted}, groups in the order of GROUPS then Other, empty groups left out."""
    found: dict[str, list[str]] = {}
    for k in keys:
        found.setdefault(group_of(k), []).append(k)
    order = [title for title, _ in GROUPS] + [OTHER]
    return {title: sorted(found[title], key=_key_order) for title in order if title in found}


def _key_order(key: str) -> tuple[int, str]:
    """A group's headline key first (`reward/mean` before `reward/accuracy`, `val_accuracy` before its tasks)."""
    headline = key in ("reward/mean", "val_accuracy", "time/step", "loss", "kl", "entropy", "completion/len_mean")
    return (0 if headline else 1, key)
