"""KL estimators between the policy and a reference policy, and the two ways of applying the penalty.

Estimators (Schulman, "Approximating KL Divergence", 2020), per sampled token, with d = ref_logp - logp and
tokens sampled from the policy, all estimating KL(pi || pi_ref):
  k1 = logp - ref_logp                 unbiased, high variance, can be negative
  k2 = 1/2 (logp - ref_logp)^2         biased, low variance, >= 0
  k3 = exp(d) - d - 1                  unbiased, low variance, >= 0 (GRPO / DeepSeekMath, TRL, verl "low_var_kl")
Registered in `KL_ESTIMATORS` as elementwise maps `(logp [N, T], ref_logp [N, T]) -> kl [N, T]` (no metrics:
they are building blocks; the helpers that use them return `(value, metrics)`).

Two places the penalty can go:
  - in the loss (GRPO, TRL's `beta`): `add_kl_to_loss`, loss_mat + beta * kl, gradient through logp;
  - in the reward (PPO / RLOO / REINFORCE++ style): `kl_penalized_rewards`, computed from behaviour-policy
    log-probs without gradient, either summed per sequence or as per-token rewards.

`masked_mean` and `entropy_from_logits` live in `functional.py` and are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import entropy_from_logits, masked_mean
from .registry import KL_ESTIMATORS, Metrics

__all__ = [
    "add_kl_to_loss",
    "entropy_from_logits",
    "k1",
    "k2",
    "k3",
    "kl_divergence",
    "kl_penalized_rewards",
    "masked_mean",
]


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 1/2 (logp - ref_logp)^2."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (same operation order as TRL's GRPOTrainer)."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def kl_divergence(
    logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, clamp: float | None = None
) -> Tensor:
    """Per-token KL estimate `[N, T]` by `estimator` name; `clamp=c` clamps it to [-c, c] (verl clamps k3 at
    10 for stability; TRL does not clamp, and neither do we by default)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp)  # [N, T]
    if clamp is not None:
        kl = torch.clamp(kl, -clamp, clamp)
    return kl


def add_kl_to_loss(
    loss_mat: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    estimator: str = "k3",
    clamp: float | None = None,
) -> tuple[Tensor, Metrics]:
    """GRPO's KL term in the loss: `loss_mat [N, T] + beta * kl [N, T]`, before `agg_loss`, as TRL does.

    The KL shares the policy loss's aggregation mode. `loss_mat` may also be `[N, 1]` (it broadcasts).
    Metrics: `kl` (masked mean of the estimate over tokens), `kl/beta`.
    """
    kl = kl_divergence(logp, ref_logp, estimator, clamp=clamp)  # [N, T]
    metrics: Metrics = {"kl": masked_mean(kl.detach(), mask).item(), "kl/beta": float(beta)}
    return loss_mat + beta * kl, metrics


def kl_penalized_rewards(
    rewards: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    clamp: float | None = None,
    per_token: bool = False,
) -> tuple[Tensor, Metrics]:
    """Subtract beta * KL from the rewards (no gradient: `logp` should be the sampling policy's log-probs).

    - `per_token=False`: `rewards [N] - beta * sum_t kl_t` over masked tokens -> `[N]` (TRL's RLOOTrainer, with
      k1 as in Ahmadian et al. 2024).
    - `per_token=True`: token-level rewards `[N, T]`: -beta * kl_t on every masked token plus the scalar
      reward on the row's last masked token (the InstructGPT / OpenRLHF PPO and REINFORCE++ layout); padding
      positions are 0.
    The default estimator is k1, the usual choice for a reward penalty. Metrics: `kl` (masked token mean),
    `kl/seq_sum` (mean over rows of the per-row sum), `kl/beta`.
    """
    if rewards.dim() != 1 or rewards.shape[0] != logp.shape[0]:
        raise ValueError(f"rewards must be [N] with N = {logp.shape[0]}, got {tuple(rewards.shape)}")
    with torch.no_grad():
        m = mask.to(logp.dtype)  # [N, T]
        kl = kl_divergence(logp.detach(), ref_logp.detach(), estimator, clamp=clamp) * m  # [N, T]
        seq_kl = kl.sum(-1)  # [N]
        metrics: Metrics = {
            "kl": masked_mean(kl, m).item(),
            "kl/seq_sum": seq_kl.mean().item() if seq_kl.numel() else 0.0,
            "kl/beta": float(beta),
        }
        if not per_token:
            return rewards - beta * seq_kl.to(rewards.dtype), metrics
        positions = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)  # [T]
        last = (positions * (m > 0).to(m.dtype)).argmax(dim=-1)  # [N]; index of the last masked token
        token_rewards = -beta * kl  # [N, T]
        token_rewards[torch.arange(m.shape[0], device=m.device), last] += rewards.to(kl.dtype)
        return token_rewards, metrics
