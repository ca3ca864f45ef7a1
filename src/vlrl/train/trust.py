"""The judge stage of Trust-GRPO (SophiaVL-R1, Fan et al. 2025, arXiv 2505.17018) in the RL loop.

After the rollout and score stages (`train/rl_rollout.py`), with `trust.enabled`:

    outcome   R_outcome: the weighted total of the configured `rewards:` (the step's usual scores); right
              / wrong is read from one of them, `trust.outcome_reward` (default "accuracy"), values in [0, 1]
    judge     `needs_judge` on those raw values: only groups that are neither all right (>= `right`) nor all
              wrong (<= `wrong`) are sent to the judge (`JudgeClient`, OpenAI-compatible HTTP, template
              `trust.template`); a completion the judge could not score (no reply, unparsable reply, unusable
              image) has no process reward (NaN), is counted, and never stops the run
    mix       `trust_weighted_rewards`: per group mu_c, mu_w and gamma, then
              R = R_outcome + gamma * alpha * exp(-step / T) * R_process (a missing R_process adds 0)
then the configured advantage estimator (normally `grpo`) runs on R as on any reward.

Departures, ours: right / wrong and gamma come from the raw values of one reward, while the process term is
added to the configured weighted total (so a format reward keeps its weight); a row whose outcome reward
could not score gets no process term. `step` is the 1-based step number that metrics.jsonl logs, so the
weight of the line with "step": s is alpha * exp(-s / T) (the first step is already slightly annealed).

Groups stay whole on one rank, so each rank judges and mixes its own groups; only the metrics are reduced.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlrl.algos import needs_judge, trust_weighted_rewards
from vlrl.rewards.judge import FAILURE_KINDS, JudgeClient, JudgeConfig
from vlrl.rewards.judge_prompts import TEMPLATES
from vlrl.train.dist import all_reduce_sum
from vlrl.train.rl_rollout import StepRollouts

log = logging.getLogger(__name__)

DEFAULT_JUDGE_URL = "http://127.0.0.1:8000/v1"
PROCESS_KEY = "trust_process"  # the process rewards' key in `StepRollouts.per_reward` (and samples.jsonl)


def default_judge() -> JudgeConfig:
    return JudgeConfig(base_url=DEFAULT_JUDGE_URL, model="judge")


@dataclass
class TrustConfig:
    """The `trust:` section of an RL config (Trust-GRPO; off unless `enabled`). Each field's trailing comment
    documents it (`vlrl rl --help` prints them)."""

    enabled: bool = False  # mix the judge's process rewards into the rewards (Trust-GRPO)
    alpha: float = 0.3  # weight of the process reward (>= 0), annealed as alpha * exp(-step / anneal_steps)
    anneal_steps: float = 500.0  # T of the annealed weight alpha * exp(-step / T), in steps (> 0)
    outcome_reward: str = "accuracy"  # key (label or name) of the `rewards:` entry whose raw values say
    #   right / wrong
    right: float = 0.9  # a group whose outcomes are all >= right is not judged (`needs_judge`)
    wrong: float = 0.1  # a group whose outcomes are all <= wrong is not judged (wrong < right)
    threshold: float = 0.5  # outcomes >= threshold are "correct" in gamma's mu_c, the others "wrong" (mu_w)
    template: str = "process"  # the judge's prompt template (process: SophiaVL-R1's thinking-reward rubric)
    judge: JudgeConfig = field(default_factory=default_judge)  # the judge's endpoint and how to call it

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"trust.alpha must be a finite number >= 0, got {self.alpha}")
        if not self.anneal_steps > 0:
            raise ValueError(f"trust.anneal_steps (T) must be > 0, got {self.anneal_steps}")
        if not self.wrong < self.right:
            raise ValueError(f"trust.wrong ({self.wrong}) must be below trust.right ({self.right})")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown trust.template {self.template!r}; valid: {', '.join(TEMPLATES)}")

    def weight(self, step: int) -> float:
        """The annealed process-reward weight alpha * exp(-step / T) of (1-based) step `step`."""
        return self.alpha * math.exp(-step / self.anneal_steps)


@dataclass
class Judged:
    """One step's judge results on this rank.

    process [n_local * G] float64: the judge's score per row; NaN where not sent or not scored.
    sent [n_local] bool: the groups that were sent. counts: this rank's counters (see `JUDGE_COUNTS`).
    """

    process: Tensor  # [n_local * G]
    sent: Tensor  # [n_local]
    counts: dict[str, float]


# The per-step judge counters, summed over ranks into `trust/<name>` metrics: the totals, the retries, and the
# no-reply failures by cause (`judge_<cause>`, one per `FAILURE_KINDS` entry; they add up to judge_no_reply).
JUDGE_COUNTS = ("judge_requests", "judge_calls", "cache_hits", "judge_failures", "judge_no_reply",
                "judge_unparsable", "judge_retries", *(f"judge_{kind}" for kind in FAILURE_KINDS))


def outcome_values(values: Sequence[float | None]) -> Tensor:
    """Raw reward values -> `[n]` float64, None as NaN."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


class TrustStage:
    """The judge and mix stage of Trust-GRPO; owns its `JudgeClient` (its cache lives across steps)."""

    def __init__(self, cfg: TrustConfig, group_size: int, client: JudgeClient | None = None) -> None:
        self.cfg = cfg
        self.group_size = group_size
        self.client = client if client is not None else JudgeClient(cfg.judge)

    def close(self) -> None:
        self.client.close()

    def judge(self, roll: StepRollouts) -> Judged:
        """Send the groups that `needs_judge` to the judge; never raises on the judge's account."""
        G = self.group_size
        outcome = outcome_values(roll.per_reward[self.cfg.outcome_reward])  # [n_local * G]
        sent = needs_judge(outcome, G, hi=self.cfg.right, lo=self.cfg.wrong)  # [n_local]
        process = torch.full_like(outcome, math.nan)  # [n_local * G]
        rows = [li * G + j for li in range(len(roll.groups)) if bool(sent[li]) for j in range(G)]
        before = self.client.stats.as_dict()
        values: list[float | None] = [None] * len(rows)
        if rows:
            completions = [roll.groups[r // G].completions[r % G].text for r in rows]
            samples = [roll.groups[r // G].sample for r in rows]
            try:
                values = self.client.score(completions, samples, self.cfg.template)
            except Exception as exc:  # noqa: BLE001 - the judge never stops the run; its rows go unscored
                log.warning("trust: judge batch failed (%s: %s); %d rows without process reward",
                            type(exc).__name__, str(exc)[:200], len(rows))
        for r, v in zip(rows, values):
            if v is not None:
                process[r] = v
        after = self.client.stats.as_dict()
        delta = {k: float(after[k] - before[k]) for k in after}
        counts = {"judge_requests": float(len(rows)), "judge_calls": delta["calls"],
                  "cache_hits": delta["cache_hits"], "judge_failures": float(sum(v is None for v in values)),
                  "judge_no_reply": delta["failures"], "judge_unparsable": delta["unparsable"],
                  "judge_retries": delta["retries"], **{f"judge_{kind}": delta[kind] for kind in FAILURE_KINDS}}
        return Judged(process, sent, counts)

    def apply(self, roll: StepRollouts, step: int) -> dict[str, float]:
        """Judge, then replace `roll.scores` by the trust-weighted rewards of (1-based) step `step`; the
        process rewards go to `roll.per_reward[PROCESS_KEY]`. Returns the step's `trust/*` metrics, global."""
        t = time.perf_counter()
        judged = self.judge(roll)
        t_judge = time.perf_counter() - t
        G = self.group_size
        outcome = outcome_values(roll.per_reward[self.cfg.outcome_reward])  # [n_local * G]
        mixed, m = trust_weighted_rewards(outcome, judged.process, G, alpha=self.cfg.alpha, step=step,
                                          anneal_steps=self.cfg.anneal_steps, threshold=self.cfg.threshold)
        bonus = torch.where(torch.isnan(mixed), torch.zeros_like(mixed), mixed - outcome)  # [n_local * G]
        roll.scores = roll.scores + bonus  # [n_local * G]; NaN (unscorable) rows stay NaN
        roll.per_reward[PROCESS_KEY] = [None if math.isnan(v) else v for v in judged.process.tolist()]
        metrics = _global_metrics(judged, m, roll, len(roll.groups))
        metrics["trust/weight"] = self.cfg.weight(step)
        metrics["time/judge"] = t_judge
        return metrics


def _global_metrics(judged: Judged, m: dict[str, float], roll: StepRollouts, n_local: int
                    ) -> dict[str, float]:
    """Sum this rank's counters and the parts of its means over ranks: the step's `trust/*` metrics."""
    n_judged = m["trust/frac_groups_judged"] * n_local  # groups with at least one process reward
    proc = judged.process[~torch.isnan(judged.process)]
    scores = roll.scores[~torch.isnan(roll.scores)]
    local = [judged.counts[k] for k in JUDGE_COUNTS]
    local += [float(n_local), float(judged.sent.sum()), n_judged, m["trust/gamma_mean"] * n_judged,
              m["trust/frac_gamma_lt_1"] * n_local, float(proc.sum()), float(proc.numel()),
              float(scores.sum()), float(scores.numel())]
    t = all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    out = {f"trust/{k}": t[i] for i, k in enumerate(JUDGE_COUNTS)}
    groups, sent, judged_groups, gamma_sum, lt1, p_sum, p_n, r_sum, r_n = t[len(JUDGE_COUNTS):]
    out.update({
        "trust/frac_groups_sent": sent / max(1.0, groups),
        "trust/frac_groups_judged": judged_groups / max(1.0, groups),
        "trust/gamma_mean": gamma_sum / judged_groups if judged_groups > 0 else 1.0,
        "trust/frac_gamma_lt_1": lt1 / max(1.0, groups),
        "trust/process_mean": p_sum / max(1.0, p_n),
        "trust/reward_mean": r_sum / max(1.0, r_n),
    })
    return out
