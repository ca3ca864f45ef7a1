"""Outcome-reward advantage estimators for group-sampled RL (one scalar reward per completion).

Every estimator takes `rewards: Tensor [B*G]`, grouped contiguously (group i = rows i*G .. (i+1)*G-1, the
order TRL and vlrl's rollout produce) and `group_size: int` (G), and returns `(advantages [B*G], metrics)`.

Unscorable completions (a reward function returned None, stored as NaN) follow TRL 1.16: they are left out
of every baseline and statistic (NaN-aware mean/std) and their advantage is 0, so they never move the policy.

Metrics (Python floats): `adv/mean`, `adv/std`, `adv/min`, `adv/max` over the returned advantages, and
`frac_zero_std_groups`, the fraction of groups whose rewards have zero std (no learning signal for
baseline-centred estimators). It is always measured per group, whatever `scale` is (TRL's
`frac_reward_zero_std` measures the batch std under `scale_rewards="batch"`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import masked_whiten, nanstd
from .registry import ADVANTAGES, Metrics

SCALES = ("group", "batch", "none")


def group_view(rewards: Tensor, group_size: int) -> Tensor:
    """Check `rewards [B*G]` and return it viewed as `[B, G]`."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide len(rewards)={rewards.numel()}")
    return rewards.view(-1, group_size)  # [B, G]


def _group_std(grouped: Tensor, unbiased: bool) -> Tensor:
    """NaN-aware per-group std `[B, 1]`; a group of one has std 0 (as TRL when num_generations == 1)."""
    if grouped.shape[1] == 1:
        return torch.zeros_like(grouped)
    return nanstd(grouped, dim=1, unbiased=unbiased, keepdim=True)  # [B, 1]


def _finish(adv: Tensor, grouped: Tensor) -> tuple[Tensor, Metrics]:
    """Zero the advantages of unscorable rows (NaN) and compute the shared metrics."""
    adv = torch.where(torch.isnan(adv), torch.zeros_like(adv), adv)  # [B*G]
    group_std = _group_std(grouped, unbiased=True)  # [B, 1]
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))  # [B, 1]; TRL's test for "zero"
    metrics: Metrics = {
        "adv/mean": adv.mean().item() if adv.numel() else 0.0,
        "adv/std": adv.std().item() if adv.numel() > 1 else 0.0,
        "adv/min": adv.min().item() if adv.numel() else 0.0,
        "adv/max": adv.max().item() if adv.numel() else 0.0,
        "frac_zero_std_groups": zero_std.float().mean().item() if zero_std.numel() else 0.0,
    }
    return adv, metrics


@ADVANTAGES.register("grpo")
def grpo(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4, unbiased: bool = True
) -> tuple[Tensor, Metrics]:
    """GRPO group-relative advantage: A_i = (r_i - mean_group(r)) / (std + eps) (Shao et al. 2024, DeepSeekMath).

    `scale` follows TRL's `scale_rewards`:
      - "group" (default): std of the completion's own group;
      - "batch": std of all rewards in the batch, numerator still centred on the group mean (as TRL, after
        "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", arXiv 2508.08221, "Lite PPO");
      - "none": no division (Dr.GRPO, same as `dr_grpo`).
    Defaults match TRL 1.16: unbiased (Bessel-corrected) std and `eps = 1e-4` added to the std (verl uses
    1e-6; the paper gives no eps). `unbiased=False` gives the population std.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(map(repr, SCALES))}")
    grouped = group_view(rewards, group_size)  # [B, G]
    centered = grouped - torch.nanmean(grouped, dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        centered = centered / (_group_std(grouped, unbiased) + eps)  # [B, G]
    elif scale == "batch":
        if rewards.numel() > 1:
            batch_std = nanstd(rewards, unbiased=unbiased)  # scalar
        else:
            batch_std = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        centered = centered / (batch_std + eps)  # [B, G]
    return _finish(centered.reshape(-1), grouped)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_size: int) -> tuple[Tensor, Metrics]:
    """Dr.GRPO advantage A_i = r_i - mean_group(r): no std division, which removes GRPO's question-difficulty
    bias (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783). Same as
    `grpo(scale="none")`; pair it with `agg_loss(mode="seq-mean-token-sum-norm")` for the full recipe."""
    return grpo(rewards, group_size, scale="none")


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_size: int) -> tuple[Tensor, Metrics]:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024, arXiv 2402.14740).

    Equals G/(G-1) * (r_i - mean_group(r)) when every reward is scorable. NaN rewards are left out of the
    siblings' baselines (divisor = scorable count - 1); a completion with no scorable sibling gets 0. As TRL's
    `RLOOTrainer`, minus its optional `normalize_advantages` whitening.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    grouped = group_view(rewards, group_size)  # [B, G]
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # [B, 1]
    total = torch.nansum(grouped, dim=1, keepdim=True)  # [B, 1]
    baseline = (total - grouped) / (count - 1).to(grouped.dtype)  # [B, G]; 0/0 = NaN -> advantage 0
    return _finish((grouped - baseline).reshape(-1), grouped)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(
    rewards: Tensor, group_size: int, *, token_counts: Tensor | None = None, eps: float = 1e-8
) -> tuple[Tensor, Metrics]:
    """REINFORCE++-baseline (Hu 2025, "REINFORCE++", arXiv 2501.03262; verl's
    `reinforce_plus_plus_baseline`, OpenRLHF's `reinforce_baseline`).

    Exact variant: a_i = r_i - mean_group(r) (the group mean replaces the critic; no per-group std division,
    unlike GRPO), then the a_i are whitened over the whole batch: A_i = (a_i - mean(a)) / sqrt(var(a) + eps)
    with the unbiased variance and eps inside the square root (verl's `masked_whiten`).

    With `token_counts [B*G]` (completion lengths) each completion is weighted by its token count, which
    reproduces verl/OpenRLHF exactly: they whiten the advantage broadcast over every completion token. Without
    it each completion counts once (our default: the estimator then depends on rewards only). The original,
    group-free REINFORCE++ (KL folded into per-token returns, then batch whitening) is not this function.
    """
    grouped = group_view(rewards, group_size)  # [B, G]
    centered = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)  # [B*G]
    weights = torch.ones_like(centered) if token_counts is None else token_counts.to(centered.dtype)  # [B*G]
    if weights.shape != centered.shape:
        raise ValueError(f"token_counts must have shape {tuple(centered.shape)}, got {tuple(weights.shape)}")
    valid = ~torch.isnan(centered)  # [B*G]
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    safe = torch.where(valid, centered, torch.zeros_like(centered))  # NaN * 0 would still be NaN
    adv = masked_whiten(safe, weights, eps=eps)  # [B*G]
    adv = torch.where(valid, adv, torch.full_like(adv, float("nan")))
    return _finish(adv, grouped)


def shape_rewards(rewards: Tensor, k: float) -> Tensor:
    """Affine reward shaping (r - 0.5) * k, as used in the RL stage of LLaVA-OneVision-1.5
    (LLaVA-OneVision-1.5-RL).

    Maps binary {0, 1} rewards to symmetric {-k/2, +k/2}: a wrong answer is penalised as strongly as a right
    one is rewarded. Note: with a group-mean baseline (grpo, dr_grpo, rloo, reinforce_pp) the shift cancels
    and only the factor k remains (and with grpo's per-group std scaling k cancels too, up to eps); the shaping
    matters for baseline-free uses or when mixed with unshaped reward terms. NaN (unscorable) stays NaN.
    """
    return (rewards - 0.5) * k
