"""Policy losses against hand-computed values (PPO-clip, clip-higher, dual-clip, GSPO, GSPO-token)."""

from __future__ import annotations

import math

import pytest
import torch

from vlrl.algos import POLICY_LOSSES, agg_loss, gspo, gspo_token, ppo_clip

DT = torch.float64


def from_ratios(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp leaf, old_logp) with exp(logp - old_logp) = ratios; old_logp = -1 everywhere."""
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=DT)
    logp = (old + torch.tensor(ratios, dtype=DT).log()).requires_grad_(True)
    return logp, old


def k3_of(r: float) -> float:
    return (r - 1) - math.log(r)


def test_ppo_clip_clip_higher_hand() -> None:
    # eps_low 0.2, eps_high 0.28 (DAPO): clip range [0.8, 1.28]
    # row 0, A = +1: r=1.5 -> max(-1.5, -1.28) = -1.28 (high clip); r=0.5 -> max(-0.5, -0.8) = -0.5
    # row 1, A = -1: r=1.1 -> max(1.1, 1.1) = 1.1;                  r=0.7 -> max(0.7, 0.8) = 0.8 (low clip)
    logp, old = from_ratios([[1.5, 0.5], [1.1, 0.7]])
    mask = torch.ones(2, 2)
    loss_mat, m = ppo_clip(logp, old, torch.tensor([1.0, -1.0], dtype=DT), mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss_mat.detach(), torch.tensor([[-1.28, -0.5], [1.1, 0.8]], dtype=DT))
    assert m["clip_frac/high"] == 0.25 and m["clip_frac/low"] == 0.25 and m["clip_frac/region"] == 0.5
    assert m["clip_frac/dual"] == 0.0
    assert m["approx_kl"] == pytest.approx(sum(k3_of(r) for r in (1.5, 0.5, 1.1, 0.7)) / 4)
    assert m["ratio/max"] == pytest.approx(1.5) and m["ratio/mean"] == pytest.approx(0.95)
    # token-mean gradient: d/dlogp (-A r) / 4 = -A r / 4 on unclipped tokens, 0 on clipped ones
    agg_loss(loss_mat, mask, "token-mean").backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4], [1.1 / 4, 0.0]], dtype=DT))


def test_ppo_clip_symmetric_default_and_mask() -> None:
    # default eps 0.2 / 0.2: r=1.25 with A=+2 -> -2 * 1.2 = -2.4; the masked position is ignored by metrics
    logp, old = from_ratios([[1.25, 9.0]])
    loss_mat, m = ppo_clip(logp, old, torch.tensor([2.0], dtype=DT), torch.tensor([[1, 0]]))
    assert loss_mat[0, 0].item() == pytest.approx(-2.4)
    assert m["clip_frac/high"] == 1.0 and m["ratio/max"] == pytest.approx(1.25)


def test_ppo_clip_dual_clip_hand() -> None:
    # A = -1, c = 3: r=4 -> max(4, 1.2) = 4 -> min(4, 3) = 3 (dual clip, zero gradient); r=2 -> 2 (< 3)
    # A = +1: r=4 -> max(-4, -1.2) = -1.2, dual clip does not apply to positive advantages
    logp, old = from_ratios([[4.0, 2.0], [4.0, 1.0]])
    adv = torch.tensor([-1.0, 1.0], dtype=DT)
    loss_mat, m = ppo_clip(logp, old, adv, torch.ones(2, 2), dual_clip=3.0)
    torch.testing.assert_close(loss_mat.detach(), torch.tensor([[3.0, 2.0], [-1.2, -1.0]], dtype=DT))
    assert m["clip_frac/dual"] == 0.25
    loss_mat.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0], [0.0, -1.0]], dtype=DT))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip(logp, old, adv, torch.ones(2, 2), dual_clip=0.5)


def test_ppo_clip_per_token_advantages_and_log_ratio_clamp() -> None:
    logp = torch.tensor([[0.0, 0.0]], dtype=DT)
    old = torch.tensor([[-50.0, 0.0]], dtype=DT)  # log-ratio 50 -> clamped to 20
    adv = torch.tensor([[-1.0, 3.0]], dtype=DT)  # [N, T]
    loss_mat, _ = ppo_clip(logp, old, adv, torch.ones(1, 2))
    torch.testing.assert_close(loss_mat, torch.tensor([[math.exp(20.0), -3.0]], dtype=DT))


def test_gspo_hand() -> None:
    # row 0: mask [1, 1, 0], log-ratios [0.1, -0.3, (5 ignored)] -> mean -0.1 -> s = e^-0.1; A = +1
    # row 1: mask [1, 1, 1], log-ratios 0.3 -> s = e^0.3 = 1.3499; A = +2
    logp = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    old = -torch.tensor([[0.1, -0.3, 5.0], [0.3, 0.3, 0.3]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 2.0], dtype=DT)
    s0, s1 = math.exp(-0.1), math.exp(0.3)
    # clip range [0.8, 1.28]: row 0 inside -> -s0; row 1 above with A > 0 -> -2 * 1.28 = -2.56
    loss_mat, m = gspo(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss_mat.detach(), torch.tensor([[-s0] * 3, [-2.56] * 3], dtype=DT))
    assert m["clip_frac/high"] == 0.5 and m["clip_frac/low"] == 0.0  # per sequence
    assert m["ratio/mean"] == pytest.approx((s0 + s1) / 2)
    value = agg_loss(loss_mat, mask, "seq-mean-token-mean")
    assert value.item() == pytest.approx((-s0 - 2.56) / 2)
    # gradient: d/dlogp_t of -s0 = -s0 / |y_0| on row 0's 2 tokens, then / N = 2; row 1 clipped -> 0
    value.backward()
    assert logp.grad is not None
    g = -s0 / 2 / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[g, g, 0.0], [0.0, 0.0, 0.0]], dtype=DT))
    # paper defaults 3e-4 / 4e-4: row 0 (s0 < 0.9997 but A > 0) unclipped, row 1 clipped at 1.0004
    loss_mat, m = gspo(logp, old, adv, mask)
    assert loss_mat[1, 0].item() == pytest.approx(-2 * 1.0004)
    assert loss_mat[0, 0].item() == pytest.approx(-s0)
    with pytest.raises(ValueError, match="gspo_token"):
        gspo(logp, old, torch.ones(2, 3, dtype=DT), mask)


def test_gspo_token_hand() -> None:
    # same data as test_gspo_hand: every token's ratio value is its sequence's s_i
    logp = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    old = -torch.tensor([[0.1, -0.3, 5.0], [0.3, 0.3, 0.3]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s0 = math.exp(-0.1)
    adv = torch.tensor([[1.0, -1.0, 0.0], [2.0, 2.0, -2.0]], dtype=DT)  # per-token advantages
    loss_mat, m = gspo_token(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # row 1 token 2: A = -2, s = 1.3499 -> max(2.6997, 2.56) = 2 * e^0.3 (unclipped on the A < 0 side)
    expected = torch.tensor([[-s0, s0, 0.0], [-2.56, -2.56, 2 * math.exp(0.3)]], dtype=DT)
    torch.testing.assert_close(loss_mat.detach(), expected)
    assert m["clip_frac/high"] == pytest.approx(2 / 5)  # token-weighted over the 5 masked tokens
    # gradient of the token-sum: -A_t * s_i on unclipped tokens (each token carries its own gradient)
    (loss_mat * mask).sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-s0, s0, 0.0], [0.0, 0.0, 2 * math.exp(0.3)]], dtype=DT)
    )


def test_all_losses_share_the_signature_and_metrics() -> None:
    logp = torch.randn(3, 4, dtype=DT)
    old = logp + 0.1 * torch.randn(3, 4, dtype=DT)
    mask = torch.ones(3, 4)
    for name in POLICY_LOSSES.names():
        loss_mat, m = POLICY_LOSSES.get(name)(logp, old, torch.randn(3, dtype=DT), mask)
        assert loss_mat.shape == (3, 4)
        assert set(m) == {
            "clip_frac/low",
            "clip_frac/high",
            "clip_frac/region",
            "clip_frac/dual",
            "approx_kl",
            "ratio/mean",
            "ratio/max",
        }
    with pytest.raises(ValueError, match="shape"):
        ppo_clip(logp, old[:, :2], torch.zeros(3), mask)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip(logp, old, torch.zeros(5), mask)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip(logp, old, torch.zeros(3), mask, eps_low=1.5)
