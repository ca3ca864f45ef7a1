"""Trust-GRPO weighting (SophiaVL-R1) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlrl.algos import grpo, needs_judge, trust_gamma, trust_weighted_rewards

NAN = float("nan")
DT = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=DT)


def test_trust_gamma_hand() -> None:
    outcome = t(1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0)
    process = t(
        0.2, 0.8, 0.4, NAN,  # group 0: mu_c = 0.3, mu_w = 0.8 -> gamma = e^-0.5
        0.9, 0.1, NAN, NAN,  # group 1: mu_c = 0.9 >= mu_w = 0.1 -> 1
        0.1, 0.2, 0.3, 0.4,  # group 2 (outcomes 1, 1, 0, 0): mu_c = 0.15 < mu_w = 0.35 -> e^-0.2
    )  # fmt: skip
    gamma = trust_gamma(outcome, process, 4)
    torch.testing.assert_close(gamma, t(math.exp(-0.5), 1.0, math.exp(0.15 - 0.35)))
    # one side empty -> gamma = 1 even if the judge scores the only side low
    torch.testing.assert_close(trust_gamma(t(1, 1), t(0.0, 0.1), 2), t(1.0))
    torch.testing.assert_close(trust_gamma(t(1, 0), t(0.0, NAN), 2), t(1.0))


def test_trust_weighted_rewards_hand() -> None:
    outcome = t(1, 0, 1, 0, 1, 1, 1, 1)
    process = t(0.2, 0.8, 0.4, NAN, NAN, NAN, NAN, NAN)  # group 1 not judged
    gamma = math.exp(0.3 - 0.8)
    weight = 0.5 * math.exp(-10 / 10)  # alpha * exp(-step / T)
    rewards, m = trust_weighted_rewards(outcome, process, 4, alpha=0.5, step=10, anneal_steps=10)
    expected = t(1 + gamma * weight * 0.2, gamma * weight * 0.8, 1 + gamma * weight * 0.4, 0, 1, 1, 1, 1)
    torch.testing.assert_close(rewards, expected)
    assert m["trust/weight"] == pytest.approx(weight)
    assert m["trust/gamma_mean"] == pytest.approx(gamma)  # over judged groups only
    assert m["trust/frac_groups_judged"] == 0.5 and m["trust/frac_gamma_lt_1"] == 0.5
    # no annealing with T = inf; step 0 gives weight alpha
    r_inf, m_inf = trust_weighted_rewards(outcome, process, 4, alpha=0.5, step=10**6, anneal_steps=math.inf)
    assert m_inf["trust/weight"] == 0.5
    # the result feeds straight into grpo
    adv, _ = grpo(r_inf, 4)
    assert adv.shape == (8,) and torch.isfinite(adv).all()


def test_trust_unjudged_and_unscorable() -> None:
    rewards, m = trust_weighted_rewards(t(1, NAN), t(NAN, 0.5), 2, alpha=1.0, step=0, anneal_steps=5)
    assert rewards[0].item() == 1.0 and math.isnan(rewards[1].item())
    assert m["trust/gamma_mean"] == 1.0 and m["trust/frac_groups_judged"] == 1.0
    _, m = trust_weighted_rewards(t(1, 0), t(NAN, NAN), 2, alpha=1.0, step=0, anneal_steps=5)
    assert m["trust/gamma_mean"] == 1.0 and m["trust/frac_groups_judged"] == 0.0
    with pytest.raises(ValueError, match="anneal_steps"):
        trust_weighted_rewards(t(1, 0), t(0, 0), 2, alpha=1.0, step=0, anneal_steps=0)
    with pytest.raises(ValueError, match="shapes differ"):
        trust_gamma(t(1, 0), t(0, 0, 0, 0), 2)


def test_needs_judge_hand() -> None:
    outcome = t(1, 1, 0, 0, 1, 0, 0.95, 0.05, 0.95, 0.9, 0.1, NAN)
    # groups: all right, all wrong, mixed, mixed (0.95 / 0.05), all >= 0.9, contains NaN
    mask = needs_judge(outcome, 2)
    assert mask.tolist() == [False, False, True, True, False, True]
    assert needs_judge(t(0.5, 0.5), 2, hi=0.5).tolist() == [False]
