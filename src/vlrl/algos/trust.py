"""Trust-GRPO reward weighting (SophiaVL-R1, Fan et al. 2025): mix a judge's process ("thinking") reward
into the outcome reward, down-weighted when the judge disagrees with the outcomes and annealed over training.

This is a reward-combination step that runs before an advantage estimator (normally `grpo`), not an
estimator itself, so it is exposed as plain functions rather than registered in `ADVANTAGES`:

    rewards, m = trust_weighted_rewards(outcome, process, G, alpha=..., step=..., anneal_steps=...)
    advantages, m2 = ADVANTAGES.get("grpo")(rewards, G)

`needs_judge` picks the groups worth sending to the (expensive) judge at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .advantages import group_view
from .registry import Metrics


def needs_judge(outcome: Tensor, group_size: int, hi: float = 0.9, lo: float = 0.1) -> Tensor:
    """Bool mask `[B]`: False for groups that are all right (every outcome >= hi) or all wrong (every
    outcome <= lo), True otherwise.

    Groups with uniform outcomes carry no signal the trust weight could use (one of the correct / wrong sets
    is empty, so gamma = 1) and, under a group baseline, little signal at all; skipping them saves judge calls.
    NaN (unscorable) outcomes count as neither right nor wrong, so a group containing one is judged.
    """
    grouped = group_view(outcome, group_size)  # [B, G]
    all_right = (grouped >= hi).all(dim=1)  # [B]
    all_wrong = (grouped <= lo).all(dim=1)  # [B]
    return ~(all_right | all_wrong)  # [B]


def trust_gamma(outcome: Tensor, process: Tensor, group_size: int, *, threshold: float = 0.5) -> Tensor:
    """Per-group trust weight gamma `[B]` (SophiaVL-R1, eq. for the trustworthiness weight).

    mu_c = mean process reward of the group's responses with outcome >= threshold, mu_w of those with
    outcome < threshold (only responses whose process reward is present, i.e. not NaN).
    gamma = 1 if mu_c >= mu_w, else exp(mu_c - mu_w) < 1: the judge is trusted less when it scores the
    reasoning of wrong answers above that of right ones.
    If either set is empty (all right, all wrong, or no process rewards on one side) there is nothing to
    compare and gamma = 1 (our choice; the paper does not define this case, and with one side empty the
    judge cannot be shown to disagree with the outcomes).
    """
    if process.shape != outcome.shape:
        raise ValueError(
            f"outcome and process shapes differ: {tuple(outcome.shape)} vs {tuple(process.shape)}"
        )
    out = group_view(outcome, group_size)  # [B, G]
    proc = group_view(process, group_size)  # [B, G]
    has_proc = ~torch.isnan(proc)  # [B, G]
    right = (out >= threshold) & has_proc  # [B, G]; NaN outcomes are in neither set
    wrong = (out < threshold) & has_proc  # [B, G]
    proc0 = torch.where(has_proc, proc, torch.zeros_like(proc))  # [B, G]
    n_right, n_wrong = right.sum(1), wrong.sum(1)  # [B]
    mu_c = (proc0 * right).sum(1) / n_right.clamp(min=1)  # [B]
    mu_w = (proc0 * wrong).sum(1) / n_wrong.clamp(min=1)  # [B]
    gamma = torch.where(mu_c >= mu_w, torch.ones_like(mu_c), torch.exp(mu_c - mu_w))  # [B]
    both = (n_right > 0) & (n_wrong > 0)  # [B]
    return torch.where(both, gamma, torch.ones_like(gamma))  # [B]


def trust_weighted_rewards(
    outcome: Tensor,
    process: Tensor,
    group_size: int,
    *,
    alpha: float,
    step: int,
    anneal_steps: float,
    threshold: float = 0.5,
) -> tuple[Tensor, Metrics]:
    """R_i = R_outcome_i + gamma_group * alpha * exp(-step / T) * R_process_i, `[B*G] -> [B*G]`.

    `anneal_steps` is the paper's T (pass `math.inf` for no annealing); `step` the optimizer step.
    A missing process reward (NaN: not judged, or the judge failed) contributes 0, so the response keeps its
    outcome reward alone; an unscorable outcome (NaN) stays NaN (the estimator then zeroes its advantage).

    Metrics: `trust/gamma_mean` (mean gamma over groups with at least one process reward; 1.0 if none),
    `trust/frac_gamma_lt_1`, `trust/weight` (alpha * exp(-step / T)), `trust/frac_groups_judged` (groups
    with at least one process reward).
    """
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps (T) must be > 0, got {anneal_steps}")
    gamma = trust_gamma(outcome, process, group_size, threshold=threshold)  # [B]
    weight = alpha * math.exp(-step / anneal_steps)
    proc0 = torch.where(torch.isnan(process), torch.zeros_like(process), process)  # [B*G]
    rewards = outcome + gamma.repeat_interleave(group_size).to(outcome.dtype) * weight * proc0  # [B*G]
    judged = (~torch.isnan(group_view(process, group_size))).any(dim=1)  # [B]
    metrics: Metrics = {
        "trust/gamma_mean": gamma[judged].mean().item() if bool(judged.any()) else 1.0,
        "trust/frac_gamma_lt_1": (gamma < 1).float().mean().item() if gamma.numel() else 0.0,
        "trust/weight": weight,
        "trust/frac_groups_judged": judged.float().mean().item() if judged.numel() else 0.0,
    }
    return rewards, metrics
