"""vlrl.algos: the RL math as pure tensor functions, registered by name.

Nothing here reads a config object or a global; every knob is an explicit argument. Typical use in the
train loop:

    adv, m_adv = ADVANTAGES.get(cfg.advantage)(rewards, G, **cfg.advantage_kwargs)        # [B*G]
    loss_mat, m_pol = POLICY_LOSSES.get(cfg.loss)(logp, old_logp, adv, mask, **cfg.loss_kwargs)  # [N, T]
    if beta:
        loss_mat, m_kl = add_kl_to_loss(loss_mat, logp, ref_logp, mask, beta=beta)
    loss = agg_loss(loss_mat, mask, cfg.agg_mode, max_len=cfg.max_completion_length)

Recipes: GRPO = grpo + ppo_clip + "seq-mean-token-mean"; DAPO = grpo + ppo_clip(eps_high=0.28) +
"token-mean"; Dr.GRPO = dr_grpo + ppo_clip + "seq-mean-token-sum-norm"; GSPO = grpo + gspo +
"seq-mean-token-mean"; Trust-GRPO = trust_weighted_rewards, then grpo.
"""

from .advantages import dr_grpo, group_view, grpo, reinforce_pp, rloo, shape_rewards
from .agg import agg_loss
from .functional import entropy_from_logits, masked_mean, masked_whiten, nanstd
from .kl import add_kl_to_loss, k1, k2, k3, kl_divergence, kl_penalized_rewards
from .losses import gspo, gspo_token, ppo_clip
from .registry import (
    ADVANTAGES,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Metrics,
    Registry,
    UnknownNameError,
)
from .trust import needs_judge, trust_gamma, trust_weighted_rewards

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Metrics",
    "Registry",
    "UnknownNameError",
    "add_kl_to_loss",
    "agg_loss",
    "dr_grpo",
    "entropy_from_logits",
    "group_view",
    "grpo",
    "gspo",
    "gspo_token",
    "k1",
    "k2",
    "k3",
    "kl_divergence",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_whiten",
    "nanstd",
    "needs_judge",
    "ppo_clip",
    "reinforce_pp",
    "rloo",
    "shape_rewards",
    "trust_gamma",
    "trust_weighted_rewards",
]
