"""Small tensor helpers shared by the algorithms: masked means, NaN-aware std, whitening, entropy."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is non-zero (mask may hold weights).

    `dim=None` averages over every element (a scalar); an int reduces that dimension only. An empty mask
    (weight sum 0) gives 0, not NaN: the numerator is 0 and the denominator is replaced by 1. For integer
    masks and finite `x` this equals TRL's `(x * mask).sum() / mask.sum().clamp(min=1)`; non-finite values
    at masked-out positions are ignored rather than turning the mean into NaN.
    """
    m = mask.to(x.dtype)
    xm = torch.where(m != 0, x * m, torch.zeros_like(x))  # inf / NaN at masked-out positions stay out
    num = xm.sum() if dim is None else xm.sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def nanstd(x: Tensor, dim: int | None = None, *, unbiased: bool = True, keepdim: bool = False) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction when `unbiased` (TRL's `nanstd`).

    With `unbiased=True` and fewer than two finite values the result is NaN, as in TRL.
    """
    valid = ~torch.isnan(x)
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=True)
    mean = torch.nanmean(x) if dim is None else torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    sq_sum = sq.sum() if dim is None else sq.sum(dim, keepdim=True)
    count_f = count.to(x.dtype)
    if unbiased:
        var = torch.where(
            count > 1, sq_sum / (count_f - 1).clamp(min=1), torch.full_like(sq_sum, float("nan"))
        )
    else:
        var = torch.where(count > 0, sq_sum / count_f.clamp(min=1), torch.full_like(sq_sum, float("nan")))
    std = var.sqrt()
    if dim is not None and not keepdim:
        std = std.squeeze(dim)
    return std


def masked_whiten(x: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """(x - masked mean) / sqrt(masked unbiased var + eps) over all masked positions (verl's `masked_whiten`).

    Positions where `mask` is 0 are returned as computed (callers multiply by the mask if they need zeros).
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    n = m.sum()
    var = var * n / (n - 1).clamp(min=1)  # Bessel's correction, as verl's masked_var(unbiased=True)
    return (x - mean) * torch.rsqrt(var + eps)


def entropy_from_logits(logits: Tensor, *, chunk_size: int = 8) -> Tensor:
    """Per-position entropy (nats) of softmax(logits): `[N, T, V] -> [N, T]` (any leading shape works).

    Computed as -sum_v p_v log p_v with log p from `log_softmax` (stable for large logits), `chunk_size` rows
    of the leading dimension N at a time so only `chunk_size * T * V` probabilities exist at once. Half-precision
    logits are upcast to float32 per chunk; the result has the compute dtype. `-inf` logits (masked vocab
    entries) contribute 0 rather than NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1])
    out = []
    for chunk in logits.split(chunk_size, dim=0):  # [n, T, V]
        if chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        logp = torch.log_softmax(chunk, dim=-1)  # [n, T, V]
        p = logp.exp()  # [n, T, V]
        logp_finite = logp.masked_fill(torch.isneginf(logp), 0.0)  # 0 * log 0 := 0
        out.append(-(p * logp_finite).sum(-1))  # [n, T]
    return torch.cat(out, dim=0)  # [N, T]
