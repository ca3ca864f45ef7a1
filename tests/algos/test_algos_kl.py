"""KL estimators, the loss / reward KL helpers, masked_mean, nanstd, whitening and entropy."""

from __future__ import annotations

import math

import pytest
import torch

from vlrl.algos import (
    KL_ESTIMATORS,
    add_kl_to_loss,
    entropy_from_logits,
    kl_divergence,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    nanstd,
)

DT = torch.float64
LN2 = math.log(2)


def test_estimators_hand() -> None:
    # logp = ln 0.5, ref = ln 0.25: logp - ref = ln 2; d = ref - logp = -ln 2
    logp = torch.tensor([[math.log(0.5)]], dtype=DT)
    ref = torch.tensor([[math.log(0.25)]], dtype=DT)
    assert kl_divergence(logp, ref, "k1").item() == pytest.approx(LN2)
    assert kl_divergence(logp, ref, "k2").item() == pytest.approx(0.5 * LN2**2)
    assert kl_divergence(logp, ref, "k3").item() == pytest.approx(0.5 + LN2 - 1)  # e^d - d - 1
    assert kl_divergence(logp, ref, "k3", clamp=0.1).item() == pytest.approx(0.1)
    assert kl_divergence(logp, logp, "k3").item() == 0.0
    with pytest.raises(KeyError, match="valid names: 'k1', 'k2', 'k3'"):
        kl_divergence(logp, ref, "k4")
    assert set(KL_ESTIMATORS.names()) == {"k1", "k2", "k3"}


def test_add_kl_to_loss_hand() -> None:
    logp = torch.full((1, 2), math.log(0.5), dtype=DT, requires_grad=True)
    ref = torch.full((1, 2), math.log(0.25), dtype=DT)
    loss_mat, m = add_kl_to_loss(torch.zeros(1, 2, dtype=DT), logp, ref, torch.tensor([[1, 0]]), beta=0.1)
    torch.testing.assert_close(loss_mat.detach(), torch.full((1, 2), 0.1 * (LN2 - 0.5), dtype=DT))
    assert m["kl"] == pytest.approx(LN2 - 0.5) and m["kl/beta"] == 0.1
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5
    loss_mat.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.full((1, 2), 0.1 * 0.5, dtype=DT))


def test_kl_penalized_rewards_hand() -> None:
    rewards = torch.tensor([1.0, 0.0], dtype=DT)
    ref = torch.zeros(2, 3, dtype=DT)
    logp = torch.tensor([[0.1, 0.2, 9.0], [0.3, 7.0, 7.0]], dtype=DT)  # k1 = logp - ref
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # summed per sequence: KL sums 0.3 and 0.3 -> rewards - 0.5 * 0.3
    out, m = kl_penalized_rewards(rewards, logp, ref, mask, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([0.85, -0.15], dtype=DT))
    assert m["kl/seq_sum"] == pytest.approx(0.3) and m["kl"] == pytest.approx(0.2)
    # per token: -beta * kl on masked tokens, the reward added on each row's last masked token
    out, _ = kl_penalized_rewards(rewards, logp, ref, mask, beta=0.5, per_token=True)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 0.9, 0.0], [-0.15, 0.0, 0.0]], dtype=DT))


def test_masked_mean_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(8 / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.0, 3.5]))
    torch.testing.assert_close(
        masked_mean(x, torch.tensor([[0, 0], [1, 1]]), dim=1), torch.tensor([0.0, 3.5])
    )
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_nanstd_and_whiten_hand() -> None:
    x = torch.tensor([1.0, float("nan"), 3.0], dtype=DT)  # finite [1, 3]: unbiased std sqrt(2)
    assert nanstd(x).item() == pytest.approx(math.sqrt(2))
    assert nanstd(x, unbiased=False).item() == pytest.approx(1.0)
    torch.testing.assert_close(
        nanstd(torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=DT), dim=1),
        torch.tensor([math.sqrt(2), 0.0], dtype=DT),
    )
    assert math.isnan(nanstd(torch.tensor([1.0])).item())
    # whiten [1, 2, 3] (mask all): mean 2, unbiased var 1 -> [-1, 0, 1]
    w = masked_whiten(torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.ones(3), eps=0.0)
    torch.testing.assert_close(w, torch.tensor([-1.0, 0.0, 1.0], dtype=DT))


def test_entropy_hand_and_against_trl() -> None:
    # uniform over 4 -> ln 4; p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4); a -inf logit contributes 0
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [0.0, math.log(3), -math.inf, -math.inf],
                [5.0, -math.inf, -math.inf, -math.inf],
            ]
        ],
        dtype=DT,
    )
    ent = entropy_from_logits(logits)
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    torch.testing.assert_close(ent, torch.tensor([expected], dtype=DT))
    # chunking does not change the result; TRL's implementation as an oracle on random logits
    trl_utils = pytest.importorskip("trl.trainer.utils")
    big = 10 * torch.randn(5, 3, 11, dtype=DT)
    torch.testing.assert_close(
        entropy_from_logits(big, chunk_size=2), entropy_from_logits(big, chunk_size=100)
    )
    torch.testing.assert_close(entropy_from_logits(big), trl_utils.entropy_from_logits(big))
    assert entropy_from_logits(big.to(torch.bfloat16)).dtype == torch.float32
    assert entropy_from_logits(torch.zeros(0, 3, 5)).shape == (0, 3)
    # gradients stay finite with -inf logits
    leaf = logits.clone().requires_grad_(True)
    entropy_from_logits(leaf).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_masked_mean_ignores_non_finite_padding() -> None:
    x = torch.tensor([[1.0, math.inf], [3.0, math.nan]])
    assert masked_mean(x, torch.tensor([[1, 0], [1, 0]])).item() == pytest.approx(2.0)
