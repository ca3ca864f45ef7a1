"""`agg_loss`: the one reduction of a per-token loss matrix to the scalar that is back-propagated.

Modes (names as verl's `agg_loss`), with L = loss_mat * mask, n_i = tokens of row i, N rows:

  "token-mean"               sum(L) / sum(n_i)            DAPO's token-level loss (Yu et al. 2025, arXiv
                                                          2503.14476): every token weighs the same.
  "seq-mean-token-mean"      (1/N) sum_i sum_t L / n_i    GRPO as written in DeepSeekMath (Shao et al. 2024).
  "seq-mean-token-sum"       (1/N) sum_i sum_t L          sequence sums (TRL's "luspo" reduction).
  "seq-mean-token-sum-norm"  sum(L) / (N * max_len)       Dr.GRPO (Liu et al. 2025, arXiv 2503.20783): a
                                                          constant normaliser instead of n_i.

TRL 1.16 `GRPOConfig.loss_type` in these terms (checked against `GRPOTrainer._compute_loss`):
  "grpo", "sapo" -> "seq-mean-token-mean"
  "bnpo"         -> "token-mean" over the local micro-batch
  "dapo" (TRL's default), "cispo", "vespo" -> "token-mean" whose denominator is the token count of the whole
                    generation batch across processes and accumulation steps (`num_items_in_batch`); pass it
                    as `num_tokens` (scaled to one micro-batch as TRL does) to reproduce it
  "dr_grpo"      -> "seq-mean-token-sum-norm" with max_len = `max_completion_length`: TRL divides the token
                    sum by N * max_completion_length, the same as (1/N) sum_i sum_t L / max_len
  "luspo"        -> "seq-mean-token-sum"
verl's "seq-mean-token-sum-norm" instead divides sum(L) by T (the padded length, or `loss_scale_factor`)
without the 1/N; we follow TRL and the Dr.GRPO paper's per-sequence mean, so `max_len` is required.
None of the modes divides by gradient-accumulation steps; the train loop does that.
"""

from __future__ import annotations

from torch import Tensor

from .registry import AGG_MODES


@AGG_MODES.register("token-mean")
def _token_mean(loss_mat: Tensor, mask: Tensor, max_len: float | None, num_tokens: float | None) -> Tensor:
    if num_tokens is not None:
        return (loss_mat * mask).sum() / max(float(num_tokens), 1.0)
    return (loss_mat * mask).sum() / mask.sum().clamp(min=1.0)


@AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(
    loss_mat: Tensor, mask: Tensor, max_len: float | None, num_tokens: float | None
) -> Tensor:
    return ((loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()  # [N] -> scalar


@AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(
    loss_mat: Tensor, mask: Tensor, max_len: float | None, num_tokens: float | None
) -> Tensor:
    return (loss_mat * mask).sum(-1).mean()  # [N] -> scalar


@AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    loss_mat: Tensor, mask: Tensor, max_len: float | None, num_tokens: float | None
) -> Tensor:
    if max_len is None or max_len <= 0:
        raise ValueError("agg mode 'seq-mean-token-sum-norm' needs max_len > 0 (the max completion length)")
    return (loss_mat * mask).sum() / (loss_mat.shape[0] * max_len)


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    max_len: float | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Reduce `loss_mat [N, T]` over the positions where `mask [N, T]` is 1 to a scalar, by `mode`.

    See the module docstring for the modes and the TRL `loss_type` each one reproduces. `max_len` is required
    by "seq-mean-token-sum-norm"; `num_tokens` optionally replaces the local token count of "token-mean" (for a
    global-batch normaliser). An unknown mode raises an error listing the valid ones. Empty rows count as 0.
    """
    fn = AGG_MODES.get(mode)
    if loss_mat.dim() != 2 or mask.shape != loss_mat.shape:
        raise ValueError(
            f"loss_mat and mask must share one [N, T] shape; got {tuple(loss_mat.shape)}, {tuple(mask.shape)}"
        )
    return fn(loss_mat, mask.to(loss_mat.dtype), max_len, num_tokens)
