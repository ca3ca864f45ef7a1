"""Advantage estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlrl.algos import ADVANTAGES, dr_grpo, group_view, grpo, reinforce_pp, rloo, shape_rewards

NAN = float("nan")


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def test_grpo_group_scale_hand() -> None:
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    adv, m = grpo(t(1, 0, 0, 1), 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # TRL's eps = 1e-4
    close(adv, t(a, -a, -a, a))
    assert m["adv/mean"] == pytest.approx(0.0) and m["adv/max"] == pytest.approx(a)
    assert m["adv/min"] == pytest.approx(-a) and m["frac_zero_std_groups"] == 0.0
    # eps=0: +-0.5 / sqrt(0.5) = +-1/sqrt(2); population std (0.5) gives +-1
    close(grpo(t(1, 0, 0, 1), 2, eps=0.0)[0], t(1, -1, -1, 1) / math.sqrt(2))
    close(grpo(t(1, 0, 0, 1), 2, eps=0.0, unbiased=False)[0], t(1, -1, -1, 1))


def test_grpo_batch_and_none_scale_hand() -> None:
    # groups [1, 0], [1, 1]: group means 0.5, 1 -> centred [0.5, -0.5, 0, 0]
    # batch std of [1, 0, 1, 1]: mean 0.75, squared deviations sum 0.75, / 3 = 0.25 -> std 0.5
    adv, m = grpo(t(1, 0, 1, 1), 2, scale="batch", eps=0.0)
    close(adv, t(1, -1, 0, 0))
    assert m["frac_zero_std_groups"] == 0.5  # the [1, 1] group
    close(grpo(t(1, 0, 1, 1), 2, scale="none")[0], t(0.5, -0.5, 0, 0))
    with pytest.raises(ValueError, match="valid: 'group', 'batch', 'none'"):
        grpo(t(1, 0), 2, scale="global")


def test_grpo_zero_std_group_and_unscorable_rewards() -> None:
    # group [1, NaN, 0]: NaN left out -> mean 0.5, std sqrt(0.5) -> [+1/sqrt2, 0, -1/sqrt2]
    # group [1, 1, 1]: zero std -> 0 / (0 + eps) = 0
    adv, m = grpo(t(1, NAN, 0, 1, 1, 1), 3, eps=0.0)
    close(adv, t(1 / math.sqrt(2), 0, -1 / math.sqrt(2), 0, 0, 0))
    assert m["frac_zero_std_groups"] == 0.5
    adv, _ = grpo(t(2.0, 3.0), 1)  # a group of one has no baseline information: advantage 0
    close(adv, t(0, 0))


def test_dr_grpo_hand() -> None:
    adv, _ = dr_grpo(t(1, 0, 0, 1, 3, 1), 3)  # group means 1/3 and 5/3, no std division
    close(adv, t(2 / 3, -1 / 3, -1 / 3, -2 / 3, 4 / 3, -2 / 3))


def test_rloo_hand() -> None:
    # group [1, 0, 0]: baselines (0+0)/2, (1+0)/2, (1+0)/2 -> [1, -0.5, -0.5]
    # group [0, 1, 1]: baselines 1, 0.5, 0.5 -> [-1, 0.5, 0.5]
    adv, _ = rloo(t(1, 0, 0, 0, 1, 1), 3)
    close(adv, t(1, -0.5, -0.5, -1, 0.5, 0.5))
    # NaN: [1, NaN, 0] -> baselines 0/1 and 1/1 -> [1, 0, -1]; [NaN, 1] -> lone scorable reward -> 0
    close(rloo(t(1, NAN, 0), 3)[0], t(1, 0, -1))
    close(rloo(t(NAN, 1), 2)[0], t(0, 0))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo(t(1, 0), 1)


def test_reinforce_pp_hand() -> None:
    # centred [0.5, -0.5, -0.5, 0.5]; batch mean 0, unbiased var 4 * 0.25 / 3 = 1/3 -> 0.5 * sqrt(3)
    adv, m = reinforce_pp(t(1, 0, 0, 1), 2, eps=0.0)
    close(adv, t(1, -1, -1, 1) * 0.5 * math.sqrt(3))
    assert m["adv/std"] == pytest.approx(1.0)


def test_reinforce_pp_token_weighted_equals_whitening_over_tokens() -> None:
    # rewards [1, 0 | 0, 0] -> centred [0.5, -0.5, 0, 0]; lengths [3, 1, 1, 1]
    # over the 6 tokens [.5, .5, .5, -.5, 0, 0]: mean 1/6, squared deviations 3/9 + 4/9 + 2/36 = 5/6,
    # unbiased var 5/6 / 5 = 1/6 -> A = (x - 1/6) * sqrt(6)
    adv, _ = reinforce_pp(t(1, 0, 0, 0), 2, token_counts=t(3, 1, 1, 1), eps=0.0)
    close(adv, (t(0.5, -0.5, 0, 0) - 1 / 6) * math.sqrt(6))
    with pytest.raises(ValueError, match="token_counts"):
        reinforce_pp(t(1, 0), 2, token_counts=t(1, 1, 1))


def test_shape_rewards_hand() -> None:
    out = shape_rewards(t(0, 1, 0.5, NAN), 2.0)
    close(out[:3], t(-1, 1, 0))
    assert math.isnan(out[3])


def test_registered_and_shape_checks() -> None:
    for name in ADVANTAGES.names():
        adv, metrics = ADVANTAGES.get(name)(t(1, 0, 0, 1), 2)
        assert adv.shape == (4,) and set(metrics) >= {"adv/mean", "adv/std", "frac_zero_std_groups"}
    assert group_view(t(1, 2, 3, 4, 5, 6), 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="divide"):
        grpo(t(1, 0, 1), 2)
    with pytest.raises(ValueError, match="1-D"):
        grpo(torch.zeros(2, 2), 2)
