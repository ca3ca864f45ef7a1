"""The loss and step stages of an RL step: μ epochs over minibatches of the step's rollouts, against the
old (sampling-time) log-probs, with the loss normalised globally.

Normalisation: each micro-batch's loss is scaled so that the sum over micro-batches and ranks equals
`agg_loss(loss_mat, mask, mode)` of the whole global minibatch:
  - "token-mean": `agg_loss(..., num_tokens=<masked tokens of the global minibatch>)`;
  - the "seq-mean-*" modes: `agg_loss(micro) * rows(micro) / rows(global minibatch)`.
Gradients are then summed across ranks (DDP or FSDP2, `vlrl.train.parallel`), so the update does not depend on
the world size or the micro-batch size.

Minibatches are cut by global group index (minibatch m holds groups [m * ceil(n/M), (m + 1) * ceil(n/M))),
never by rank, for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from vlrl.algos import add_kl_to_loss, agg_loss
from vlrl.rollout.types import Group
from vlrl.train.dist import DistInfo, all_reduce_sum
from vlrl.train.logprobs import CHUNK_TOKENS, Row, build_rows, length_order, row_logprobs, use_shared_prefix
from vlrl.train.parallel import call, clip_grads, matched_count, no_sync, same_blocks, unwrap

# Policy-loss metrics averaged over micro-batches (weighted by their masked tokens) and reported.
LOSS_METRICS = ("clip_frac/low", "clip_frac/high", "clip_frac/region", "clip_frac/dual", "approx_kl", "ratio/mean")


@dataclass
class UpdateBatch:
    """This rank's rows of one step, ready for the loss.

    groups, gids, n_groups: as `StepRollouts`. advantages [n_local * G]; row_mask [n_local * G] (0.0: the row
    is left out of the loss, e.g. a truncated completion with `mask_truncated`).
    old_logp / ref_logp: one [T_r] tensor per local row, or None (old: use the current detached log-probs,
    valid for one epoch over one minibatch; ref: no KL term in the loss).
    """

    groups: list[Group]
    gids: list[int]
    n_groups: int
    advantages: Tensor  # [n_local * G]
    row_mask: Tensor  # [n_local * G]
    old_logp: list[Tensor] | None
    ref_logp: list[Tensor] | None
    spare: Group | None = None  # see `StepRollouts.spare`


@dataclass(kw_only=True)
class LossSpec:
    """The loss knobs (from RLConfig): a policy loss function with its scalars, agg mode, KL. Built by keyword
    (`vlrl.train.rl.build_run`): eighteen knobs in a row are too easy to misplace."""

    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]
    loss_kwargs: dict[str, Any]
    agg_mode: str
    max_len: int
    beta: float
    kl_estimator: str
    kl_clamp: float | None
    kl_in_loss: bool
    temperature: float
    suppress_ids: list[int]
    ppo_epochs: int
    num_minibatches: int
    micro_batch_size: int
    max_grad_norm: float
    pad_id: int
    image_id: int
    share_vision: bool = True
    shared_prefix: bool = True  # prompt once per group in training forwards (see `vlrl.train.logprobs`)
    chunk_tokens: int = CHUNK_TOKENS  # completion tokens per LM-head chunk (see `vlrl.train.logprobs`)


def _pad(rows: Sequence[Tensor], width: int, device: torch.device) -> Tensor:
    """Per-row 1-D tensors -> `[b, width]`, zero-padded."""
    out = pad_sequence(list(rows), batch_first=True) if rows else torch.zeros(0, width)
    if out.shape[1] < width:
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
    return out[:, :width].to(device)


class _Sums:
    """Weighted sums of metrics, all-reduced once at the end (every rank must add the same keys)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, key: str, value: float, weight: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + value * weight

    def reduce(self, keys: Sequence[str]) -> dict[str, float]:
        t = torch.tensor([self.values.get(k, 0.0) for k in keys], dtype=torch.float64)
        return dict(zip(keys, all_reduce_sum(t).tolist()))


def _micro_loss(root: Any, batch: UpdateBatch, rows: list[Row], row_ids: list[int], spec: LossSpec,
                norm: tuple[float, float], info: DistInfo, sums: _Sums, first_pass: bool) -> None:
    """Forward + backward of one micro-batch (through the wrapped root, `vlrl.train.parallel`); adds its metrics to
    `sums`."""
    shared = use_shared_prefix(unwrap(root), spec.shared_prefix)
    rb = build_rows(batch.groups, rows, spec.pad_id, spec.image_id, spec.share_vision, shared)
    same_blocks(root, any(batch.groups[g].prompt.pixel_values is not None for g, _ in rows))
    out = call(root, row_logprobs, batch.groups, rb, temperature=spec.temperature, suppress_ids=spec.suppress_ids,
               device=info.device, with_entropy=first_pass, chunk_tokens=spec.chunk_tokens)
    width = out.logp.shape[1]
    mask = out.mask * batch.row_mask[row_ids].to(out.mask)[:, None]  # [b, T]
    old = out.logp.detach() if batch.old_logp is None else _pad([batch.old_logp[i] for i in row_ids], width,
                                                                 info.device)  # [b, T]
    adv = batch.advantages[row_ids].to(out.logp)  # [b]
    loss_mat, m = spec.loss_fn(out.logp, old, adv, mask, **spec.loss_kwargs)  # [b, T]
    tokens = float(mask.sum())
    if spec.kl_in_loss and batch.ref_logp is not None:
        ref = _pad([batch.ref_logp[i] for i in row_ids], width, info.device)  # [b, T]
        loss_mat, m_kl = add_kl_to_loss(loss_mat, out.logp, ref, mask, beta=spec.beta, estimator=spec.kl_estimator,
                                        clamp=spec.kl_clamp)
        sums.add("kl", m_kl["kl"], tokens)
    n_rows, n_tokens = norm
    if spec.agg_mode == "token-mean":
        loss = agg_loss(loss_mat, mask, spec.agg_mode, max_len=spec.max_len, num_tokens=n_tokens)
    else:
        loss = agg_loss(loss_mat, mask, spec.agg_mode, max_len=spec.max_len) * (len(rows) / n_rows)
    loss.backward()
    sums.add("loss", float(loss.detach()))
    sums.add("tokens", tokens)
    for key in LOSS_METRICS:
        sums.add(key, m.get(key, 0.0), tokens)
    if first_pass and out.entropy is not None:
        sums.add("entropy", float((out.entropy * mask).sum()))
        sums.add("entropy_tokens", tokens)
        sampled = _pad([batch.groups[g].completions[j].logprobs for g, j in rows], width, info.device)  # [b, T]
        sums.add("logp_diff", float(((old - sampled).abs() * out.mask).sum()))
        sums.add("all_tokens", float(out.mask.sum()))


def minibatch_rows(batch: UpdateBatch, group_size: int, m: int, num_minibatches: int) -> tuple[list[Row], list[int], int]:
    """This rank's rows of global minibatch `m` (as (group, completion) pairs and flat row ids) and the
    global row count of that minibatch."""
    per = math.ceil(batch.n_groups / num_minibatches)
    lo, hi = m * per, min(batch.n_groups, (m + 1) * per)
    rows = [(li, j) for li, gid in enumerate(batch.gids) if lo <= gid < hi for j in range(group_size)]
    return rows, [li * group_size + j for li, j in rows], max(0, hi - lo) * group_size


def update_is_finite(local_loss: float, grad_norm: float) -> bool:
    """Whether an optimizer update may be taken: its loss on every rank and its global gradient norm are finite
    (a loss can be NaN through a term without gradient while the norm is finite; ranks must agree)."""
    bad = all_reduce_sum(torch.tensor(0.0 if math.isfinite(local_loss) else 1.0, dtype=torch.float64))
    return float(bad) == 0.0 and math.isfinite(grad_norm)


def _idle_backward(root: Any, spare: Group | None, spec: LossSpec, info: DistInfo, sync: bool) -> None:
    """A forward and backward with weight zero on one row of `spare`: the collectives of a micro-batch this rank does
    not have (another rank does), so that every rank's DDP / FSDP2 communication matches."""
    if spare is None:
        raise RuntimeError("this rank sampled no group this step, so it cannot take part in the other ranks' "
                           "micro-batches; use rollout.batch_size >= the number of ranks")
    rb = build_rows([spare], [(0, 0)], spec.pad_id, spec.image_id, spec.share_vision,
                    use_shared_prefix(unwrap(root), spec.shared_prefix))
    same_blocks(root, spare.prompt.pixel_values is not None)
    with no_sync(root, sync):
        out = call(root, row_logprobs, [spare], rb, temperature=spec.temperature, suppress_ids=spec.suppress_ids,
                   device=info.device, chunk_tokens=spec.chunk_tokens)
        (out.logp.sum() * 0.0).backward()


def policy_update(root: Any, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, batch: UpdateBatch,
                  spec: LossSpec, group_size: int, info: DistInfo) -> dict[str, float]:
    """`ppo_epochs` x `num_minibatches` optimizer steps; returns the step's loss metrics (global). `root`: the
    wrapped policy (`vlrl.train.parallel`); gradients already in `.grad` (the replay term, not yet synchronised
    under DDP) join the first update, whose last backward sums them across ranks."""
    sums = _Sums()
    grad_norms: list[float] = []
    skipped = 0  # updates left out for a loss or gradient norm that is not finite
    for epoch in range(spec.ppo_epochs):
        for m in range(spec.num_minibatches):
            rows, row_ids, n_rows = minibatch_rows(batch, group_size, m, spec.num_minibatches)
            if n_rows == 0:
                continue  # same decision on every rank: n_rows is global
            if len(rows) > spec.micro_batch_size:  # micro-batches of similar lengths (the update does not change)
                order = length_order(batch.groups, rows)
                rows, row_ids = [rows[i] for i in order], [row_ids[i] for i in order]
            lengths = [batch.groups[g].completions[j].length for g, j in rows]
            local_tokens = float(sum(float(batch.row_mask[i]) * n for i, n in zip(row_ids, lengths)))
            n_tokens = float(all_reduce_sum(torch.tensor(local_tokens, dtype=torch.float64)))
            loss_before = sums.values.get("loss", 0.0)
            starts = list(range(0, len(rows), spec.micro_batch_size))
            rounds = matched_count(len(starts), root)  # backwards are collectives under ddp / fsdp
            for r in range(rounds):
                last = r == rounds - 1
                if r >= len(starts):
                    _idle_backward(root, batch.spare, spec, info, sync=last)
                    continue
                k = starts[r]
                with no_sync(root, last):
                    _micro_loss(root, batch, rows[k : k + spec.micro_batch_size],
                                row_ids[k : k + spec.micro_batch_size], spec, (n_rows, n_tokens), info, sums,
                                first_pass=epoch == 0)
            grad_norms.append(clip_grads(params, spec.max_grad_norm))
            if update_is_finite(sums.values.get("loss", 0.0) - loss_before, grad_norms[-1]):
                opt.step()
            else:  # skipped: weights and optimizer moments unchanged (`vlrl.train.harness.NonFiniteCount`)
                skipped += 1
            opt.zero_grad(set_to_none=True)
    g = sums.reduce(("loss", "tokens", "entropy", "entropy_tokens", "kl", "logp_diff", "all_tokens", *LOSS_METRICS))
    updates = max(1, len(grad_norms))
    out = {"loss": g["loss"] / updates, "grad_norm": sum(grad_norms) / updates, "updates": float(len(grad_norms)),
           "skipped_nonfinite": skipped,
           "entropy": g["entropy"] / max(1.0, g["entropy_tokens"]),
           "rollout/logp_diff": g["logp_diff"] / max(1.0, g["all_tokens"])}
    out.update({key: g[key] / max(1.0, g["tokens"]) for key in LOSS_METRICS})
    if spec.kl_in_loss and spec.beta > 0:
        out["kl"] = g["kl"] / max(1.0, g["tokens"])
    return out

