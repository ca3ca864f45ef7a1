"""agg_loss modes against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from vlrl.algos import agg_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # row 0 has 2 tokens, row 1 has 1


def test_modes_hand() -> None:
    assert agg_loss(LOSS, MASK, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert agg_loss(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    # Dr.GRPO as TRL: sum / (N * max_len) = 7 / (2 * 4)
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(7 / 8)
    # a global token count (TRL "dapo" num_items_in_batch) replaces the local one
    assert agg_loss(LOSS, MASK, "token-mean", num_tokens=10).item() == pytest.approx(0.7)


def test_empty_row_and_empty_mask() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert agg_loss(LOSS, mask, "seq-mean-token-mean").item() == pytest.approx(1.5 / 2)  # empty row counts 0
    assert agg_loss(LOSS, torch.zeros(2, 3), "token-mean").item() == 0.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="valid names: 'seq-mean-token-mean', 'seq-mean-token-sum'"):
        agg_loss(LOSS, MASK, "sum")
    with pytest.raises(KeyError):
        agg_loss(LOSS, MASK, "bnpo")
    with pytest.raises(ValueError, match="max_len"):
        agg_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="shape"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")
