"""Clipped policy-gradient losses (PPO-clip / DAPO clip-higher / dual-clip, GSPO, GSPO-token).

Inputs, shared by every loss:
  logp      [N, T]  per-token log-probs of the sampled tokens under the current policy (carries the gradient)
  old_logp  [N, T]  the same under the policy that sampled them (no gradient; equal to `logp.detach()` when
                    each batch gets a single optimizer step)
  advantages [N] (one per completion) or [N, T] (per token)
  mask      [N, T]  1 for completion tokens that count, 0 for padding (and e.g. tool-output tokens)

Each loss returns `(loss_mat [N, T], metrics)` before aggregation; reduce it with `agg_loss`. Entries at
mask == 0 positions are not meaningful. All losses are written as PPO's max(-A r, -A clip(r)), which is
TRL's -min(r A, clip(r) A) term by term.

Metrics (Python floats): `clip_frac/low` (ratio < 1 - eps_low with A < 0), `clip_frac/high`
(ratio > 1 + eps_high with A > 0), `clip_frac/region` (either; TRL's `clip_ratio/*_mean`), `clip_frac/dual`
(dual clip active), `ratio/mean`, `ratio/max` of the ratio that is clipped; token-level losses average
them over masked tokens, `gspo` over sequences (as TRL's `importance_sampling_level="sequence"`).
`approx_kl` is always k3 of the per-token ratio over masked tokens, Schulman's estimator of
KL(old || new): (r - 1) - log r.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import masked_mean
from .registry import POLICY_LOSSES, Metrics


def _check(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes; return advantages as `[N, 1]` or `[N, T]` and the mask in logp's dtype."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one [N, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        adv = advantages.unsqueeze(1)  # [N, 1]
    elif advantages.shape in (logp.shape, (logp.shape[0], 1)):
        adv = advantages  # [N, T] or [N, 1]
    else:
        raise ValueError(f"advantages must be [N], [N, 1] or [N, T]; got {tuple(advantages.shape)}")
    return adv.to(logp.dtype), mask.to(logp.dtype)


def _check_eps(eps_low: float, eps_high: float) -> None:
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0; got eps_low={eps_low}, eps_high={eps_high}"
        )


def _clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """PPO's pessimistic surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); broadcasts."""
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(loss_unclipped, loss_clipped)


def _ratio_metrics(
    ratio: Tensor,
    adv: Tensor,
    weight: Tensor,
    eps_low: float,
    eps_high: float,
    token_log_ratio: Tensor,
    m: Tensor,
) -> Metrics:
    """Clip fractions and ratio stats of the clipped `ratio`, averaged with `weight` (the token mask, or ones
    over sequences), plus `approx_kl`: k3 of the per-token ratio, (r - 1) - log r >= 0, over masked tokens."""
    with torch.no_grad():
        ratio, adv, token_log_ratio = ratio.detach(), adv.detach(), token_log_ratio.detach()
        shape = torch.broadcast_shapes(ratio.shape, adv.shape, weight.shape)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).expand(shape).to(weight.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).expand(shape).to(weight.dtype)
        ratio_b, weight_b = ratio.expand(shape), weight.expand(shape)
        approx_kl = torch.expm1(token_log_ratio) - token_log_ratio  # [N, T]
        return {
            "clip_frac/low": masked_mean(low, weight_b).item(),
            "clip_frac/high": masked_mean(high, weight_b).item(),
            "clip_frac/region": masked_mean(torch.maximum(low, high), weight_b).item(),
            "approx_kl": masked_mean(approx_kl, m).item(),
            "ratio/mean": masked_mean(ratio_b, weight_b).item(),
            "ratio/max": ratio_b[weight_b > 0].max().item() if bool((weight_b > 0).any()) else 1.0,
        }


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clip: float | None = 20.0,
) -> tuple[Tensor, Metrics]:
    """Per-token PPO clipped surrogate (Schulman et al. 2017), the GRPO / DAPO / Dr.GRPO policy loss.

    ratio r_t = exp(logp_t - old_logp_t); loss_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)).
    Defaults are the textbook symmetric 0.2 / 0.2 (TRL's default too). DAPO's clip-higher decouples the bounds:
    eps_low=0.2, eps_high=0.28 (Yu et al. 2025, arXiv 2503.14476).

    `dual_clip=c` (c > 1; verl's default is 3.0) adds dual-clip PPO (Ye et al. 2020, arXiv 1912.09729) for
    negative advantages, exactly as verl's `compute_policy_loss`:
        loss_t = min(max(-A r, -A clip(r)), -A c)  if A < 0  else  max(-A r, -A clip(r)),
    i.e. the loss of a negative-advantage token whose ratio exceeds c stops growing (and its gradient stops).
    TRL has no dual clip; its `delta` option (INTELLECT-2 two-sided clipping) is a different rule.

    `log_ratio_clip` clamps logp - old_logp to [-c, c] before exp, as verl does (c = 20), to keep exp finite;
    None disables it. Within the clamp range the result equals TRL's exactly.
    """
    _check_eps(eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl's default is 3.0), got {dual_clip}")
    adv, m = _check(logp, old_logp, advantages, mask)  # [N, 1|T], [N, T]
    log_ratio = logp - old_logp  # [N, T]
    if log_ratio_clip is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clip, log_ratio_clip)
    ratio = torch.exp(log_ratio)  # [N, T]
    loss = _clipped_surrogate(ratio, adv, eps_low, eps_high)  # [N, T]
    metrics = _ratio_metrics(ratio, adv, m, eps_low, eps_high, log_ratio, m)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip  # [N, 1|T]
        dual_active = (adv < 0) & (loss > loss_dual)  # [N, T]
        loss = torch.where(adv < 0, torch.minimum(loss, loss_dual), loss)  # [N, T]
        metrics["clip_frac/dual"] = masked_mean(dual_active.to(m.dtype).expand_as(m), m).item()
    else:
        metrics["clip_frac/dual"] = 0.0
    return loss, metrics


def _seq_log_ratio(logp: Tensor, old_logp: Tensor, m: Tensor, log_ratio_clip: float | None) -> Tensor:
    """GSPO's length-normalised sequence log-ratio (1/|y|) sum_t (logp_t - old_logp_t): `[N, T] -> [N, 1]`."""
    seq = masked_mean(logp - old_logp, m, dim=-1).unsqueeze(-1)  # [N, 1]
    if log_ratio_clip is not None:
        seq = torch.clamp(seq, -log_ratio_clip, log_ratio_clip)
    return seq


@POLICY_LOSSES.register("gspo")
def gspo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    log_ratio_clip: float | None = 20.0,
) -> tuple[Tensor, Metrics]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

    s_i = exp((1/|y_i|) sum_t (logp_t - old_logp_t)) over the masked tokens; the sequence loss
    max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) is broadcast to every token of row i, so
    `agg_loss(..., "seq-mean-token-mean")` gives the paper's (1/G) sum_i loss_i (what TRL computes with
    `importance_sampling_level="sequence"`, `loss_type="grpo"`). The gradient flows through s_i.

    Clip range: the paper uses eps_low=3e-4, eps_high=4e-4 (our defaults; sequence ratios sit much closer to 1
    than token ratios). Innovator-VL instead reuses the token-level 0.2 / 0.28: pass them explicitly.
    `advantages` must be per sequence ([N] or [N, 1]); use `gspo_token` for per-token advantages.
    """
    _check_eps(eps_low, eps_high)
    adv, m = _check(logp, old_logp, advantages, mask)  # [N, 1], [N, T]
    if adv.shape[1] != 1:
        raise ValueError("gspo takes one advantage per sequence ([N]); use gspo_token for [N, T] advantages")
    seq_log_ratio = _seq_log_ratio(logp, old_logp, m, log_ratio_clip)  # [N, 1]
    s = torch.exp(seq_log_ratio)  # [N, 1]
    loss_seq = _clipped_surrogate(s, adv, eps_low, eps_high)  # [N, 1]
    ones = torch.ones_like(s)  # every sequence weighs 1 in the clip metrics
    metrics = _ratio_metrics(s, adv, ones, eps_low, eps_high, logp - old_logp, m)
    metrics["clip_frac/dual"] = 0.0
    return loss_seq.expand_as(logp), metrics  # [N, T]


@POLICY_LOSSES.register("gspo_token")
def gspo_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    log_ratio_clip: float | None = 20.0,
) -> tuple[Tensor, Metrics]:
    """GSPO-token (Zheng et al. 2025, arXiv 2507.18071, section 4.3), for per-token advantages A_{i,t}.

    s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], computed in log space as
    logp_t - sg[logp_t] + sg[log s_i]: its value is the sequence ratio s_i on every token, its gradient is
    s_i * grad logp_t. Loss per token max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t})). With A_{i,t} = A_i and
    "seq-mean-token-mean" aggregation it equals `gspo` in value and gradient (the paper's remark; verl's
    "gspo" loss is implemented this way). Defaults and clip ranges as `gspo`.
    """
    _check_eps(eps_low, eps_high)
    adv, m = _check(logp, old_logp, advantages, mask)  # [N, 1|T], [N, T]
    seq_log_ratio = _seq_log_ratio(logp, old_logp, m, log_ratio_clip).detach()  # [N, 1]
    log_s = logp - logp.detach() + seq_log_ratio  # [N, T]; value log s_i, gradient d logp_t
    s = torch.exp(log_s)  # [N, T]
    loss = _clipped_surrogate(s, adv, eps_low, eps_high)  # [N, T]
    metrics = _ratio_metrics(s, adv, m, eps_low, eps_high, logp - old_logp, m)
    metrics["clip_frac/dual"] = 0.0
    return loss, metrics
