"""Per-token log-probs (and entropies) of sampled completions under a model, for the RL loss.

A batch of rows (one row = one completion of one `Group`) is laid out as

    [ left-padded prompt (L) | completion, right-padded (T) ]        input_ids [b, L + T]

so every row's completion occupies the same last T positions, and the forward keeps logits only there
(`logits_to_keep = T + 1`, the last prompt position predicting the first completion token): logits are
[b, T, V], never [b, L + T, V]. Log-probs are taken of softmax(logits / temperature) with the vision tokens
removed, i.e. the very distribution the rollout engine sampled from (TRL and verl also divide by the
sampling temperature); with top-k / top-p off they equal the engine's sampling log-probs.

The LM head runs in chunks (`chunk_tokens` completion tokens at a time, padding skipped), each chunk's logits
recomputed in the backward instead of kept (activation checkpointing of the head): the [rows x T x vocab] fp32
logits, the largest tensor of an RL step at a real vocabulary (4,096 tokens x 151,936 x 4 bytes is 2.5 GB), never
exist at once. So the forward stops at the decoder's last hidden states (`model.model`) and applies the head
(`get_output_embeddings()`) itself.

Shared prefix (`shared_prefix=True`, the default): the rows of one group share their prompt, so the prompt runs
once per distinct group of the batch (images encoded there, once) with a KV cache, which is expanded to the
group's rows by a differentiable `index_select`; the completions then run against it (`vlrl.rollout.prefix`).
The prompt's last position gives each row's first completion logit, so only the first T - 1 completion tokens
are inputs. Same log-probs and gradients as the plain layout (within float rounding; tested), with the prompt
tokens computed once per group instead of once per row, forward and backward. It composes with activation
checkpointing (`vlrl.rollout.prefix`: the prompt pass's decoder layers are not checkpointed, the completions'
are); attention layers without a full cache take the plain layout instead (`use_shared_prefix`, logged once).

Plain layout (`shared_prefix=False`): every row is [prompt | completion] as above. With `share_vision=True`
(default) the vision tower still runs once per distinct prompt in the batch and its features are handed to every
row of that prompt through transformers' `mm_encoder_outputs`; `share_vision=False` repeats `pixel_values` per row.

What differs between model families is asked of the family's record (`vlrl.models.families`): the positions
(Qwen-VL's M-RoPE rope index, InternVL's 1-D positions), the forward's inputs (`image_grid_thw`,
`mm_token_type_ids` or neither), how the images are encoded and how many entries of the vision output belong to
each prompt (Qwen-VL: one per image, plus Qwen3-VL's deepstack features; InternVL: one per tile). A family that
cannot share vision features gets `pixel_values` per row instead (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import register_dataclass
from torch.utils.checkpoint import checkpoint

from vlrl.algos import entropy_from_logits
from vlrl.models.cache_name import cache_arg
from vlrl.models.families import Family, family_of_model, log_fallback
from vlrl.rollout.prefix import (
    completion_pass,
    continuation_mask,
    expand_cache,
    prefill,
    prompt_inputs,
    prompt_pass,
    shared_prefix_unsupported,
    uses_activation_checkpointing,
)
from vlrl.rollout.types import Group
from vlrl.train.parallel import call, is_fsdp, matched_count, same_blocks, unwrap

log = logging.getLogger(__name__)

Row = tuple[int, int]  # (index of the group in the caller's list, index of the completion in the group)

__all__ = ["CHUNK_TOKENS", "CompletionStates", "Row", "RowBatch", "build_rows", "chunked_logprobs",
           "completion_states", "length_order", "row_logprobs", "rows_logprobs_nograd", "token_logprobs",
           "use_shared_prefix", "uses_activation_checkpointing"]

CHUNK_TOKENS = 2048  # completion tokens per LM-head chunk unless the caller says otherwise


@dataclass
class RowBatch:
    """Model inputs for a list of rows.

    Plain layout (prompt_index None): inputs = input_ids / attention_mask / mm_token_type_ids [b, L + T],
        image_grid_thw [I, 3] (Qwen-VL: one entry per image of each row, row-major) and either pixel_values
        [P, D] / [N, 3, H, W] (per row) or nothing (shared vision); groups_with_images: the distinct groups whose
        images the rows need. The forward takes what the model's family takes of these.
    Shared prefix: inputs = the distinct groups' prompts, left-padded [U, L] (+ their pixel_values / grids);
        prompt_index [b]: each row's prompt in `inputs`; groups_with_images: empty.
    completion_ids [b, T]; mask [b, T] (1.0 on completion tokens, 0.0 on padding); T = longest completion.
    """

    inputs: dict[str, Tensor]
    completion_ids: Tensor  # [b, T]
    mask: Tensor  # [b, T]
    rows: list[Row]
    groups_with_images: list[int]
    prompt_index: Tensor | None = None  # [b]


def _completions(groups: Sequence[Group], rows: Sequence[Row], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded completion ids [b, T] (pad_id) and their mask [b, T] (float)."""
    completions = [groups[g].completions[j].token_ids for g, j in rows]
    t = max(1, max(len(c) for c in completions))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # [b, T]
    mask = torch.zeros((len(rows), t))  # [b, T]
    for r, c in enumerate(completions):
        ids[r, : len(c)] = c
        mask[r, : len(c)] = 1.0
    return ids, mask


def build_rows(groups: Sequence[Group], rows: Sequence[Row], pad_id: int, image_id: int,
               share_vision: bool = True, shared_prefix: bool = False) -> RowBatch:
    """Lay out `rows` for a forward: the distinct prompts + completions (`shared_prefix`), else
    [left-padded prompt | right-padded completion] per row (see the module docstring)."""
    if shared_prefix:
        uniq: list[int] = []
        for g, _ in rows:
            if g not in uniq:
                uniq.append(g)
        index = torch.tensor([uniq.index(g) for g, _ in rows], dtype=torch.long)  # [b]
        ids, cmask = _completions(groups, rows, pad_id)  # [b, T]
        prompts_in = prompt_inputs([groups[g].prompt for g in uniq], pad_id, image_id)  # [U, L]
        return RowBatch(prompts_in, ids, cmask, list(rows), [], index)
    prompts = [groups[g].prompt.input_ids for g, _ in rows]
    completions = [groups[g].completions[j].token_ids for g, j in rows]
    b, lp, t = len(rows), max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    input_ids = torch.full((b, lp + t), pad_id, dtype=torch.long)  # [b, L + T]
    attention = torch.zeros((b, lp + t), dtype=torch.long)  # [b, L + T]
    for r, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[r, lp - len(p) : lp] = p
        input_ids[r, lp : lp + len(c)] = c
        attention[r, lp - len(p) : lp + len(c)] = 1
    mask = attention[:, lp:].float()  # [b, T]
    inputs: dict[str, Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": (input_ids == image_id).long() * attention,  # [b, L + T]
    }
    grids = [groups[g].prompt.image_grid_thw for g, _ in rows]
    if any(x is not None for x in grids):
        inputs["image_grid_thw"] = torch.cat([x for x in grids if x is not None])  # [I, 3]
    if not share_vision:
        inputs.update(_row_pixels(groups, rows))
    with_images: list[int] = []
    if share_vision:
        for g, _ in rows:
            if groups[g].prompt.pixel_values is not None and g not in with_images:
                with_images.append(g)
    return RowBatch(inputs, input_ids[:, lp:].clone(), mask, list(rows), with_images)


def _row_pixels(groups: Sequence[Group], rows: Sequence[Row]) -> dict[str, Tensor]:
    """pixel_values of every row's prompt, row-major ([P, D] or [N, 3, H, W]); empty when no row has images."""
    pix = [groups[g].prompt.pixel_values for g, _ in rows]
    if not any(x is not None for x in pix):
        return {}
    return {"pixel_values": torch.cat([x for x in pix if x is not None])}  # [P, D] or [N, 3, H, W]


def _shared_image_features(model: Any, family: Family, groups: Sequence[Group], batch: RowBatch,
                           device: torch.device) -> dict[str, Any]:
    """Encode each distinct prompt's images once; return `mm_encoder_outputs` with one copy per row."""
    if family.select_images is None:
        raise ValueError(f"family {family.name} cannot share vision features")
    uniq = batch.groups_with_images
    enc = family.encode_images(model, [groups[g].prompt for g in uniq], device)
    counts = [family.image_units(groups[g].prompt) for g in uniq]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    where = {g: range(s, s + c) for g, s, c in zip(uniq, starts, counts)}
    index = [i for g, _ in batch.rows if g in where for i in where[g]]
    return {"image": family.select_images(enc, index)}


@dataclass
class CompletionStates:
    """What predicts each completion token: hidden [b, T', H], the decoder's last hidden states before the LM head,
    for completion tokens T - T' .. T - 1; first_logits [b, V] or None: with the shared prefix the logits that
    predict token 0 come from the prompt pass (then T' = T - 1)."""

    hidden: Tensor
    first_logits: Tensor | None = None


def _base(model: Any) -> Any:
    """The model without its LM head (transformers' `model.model`: the vision tower, merger and text decoder)."""
    base = getattr(model, "model", None)
    if base is None or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no `.model` decoder and output head to compute log-probs with")
    return base


def _shared_prefix_states(model: Any, batch: RowBatch, device: torch.device) -> CompletionStates:
    """Prompt forward at the U distinct prompts, KV cache expanded to the b rows, completions against it."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    index = batch.prompt_index.to(device)  # type: ignore[union-attr]  # [b]
    with prompt_pass(model):
        first, cache, next_pos = prefill(model, inputs)  # [U, V], KV of [U, L], [U]
    logits0 = first.index_select(0, index)  # [b, V]: predicts completion token 0
    t = batch.completion_ids.shape[1]
    if t == 1:
        return CompletionStates(logits0.new_zeros(logits0.shape[0], 0, 1), logits0)
    ids = batch.completion_ids[:, :-1].to(device)  # [b, T - 1]: the last token predicts nothing we score
    attention = continuation_mask(inputs["attention_mask"].index_select(0, index),
                                  batch.mask[:, :-1].to(device))  # [b, L + T - 1]
    positions = family_of_model(model).text_positions(next_pos.index_select(0, index), 0, t - 1)  # [(3,) b, T - 1]
    with completion_pass(model):
        out = _base(model)(input_ids=ids, attention_mask=attention, position_ids=positions,
                           **cache_arg(expand_cache(cache, index)), use_cache=True)
    return CompletionStates(out.last_hidden_state, logits0)  # [b, T - 1, H], [b, V]


def completion_states(model: Any, groups: Sequence[Group], batch: RowBatch, device: torch.device) -> CompletionStates:
    """The hidden states (and, with the shared prefix, first logits) that predict the rows' completion tokens."""
    if batch.prompt_index is not None:
        return _shared_prefix_states(model, batch, device)
    family = family_of_model(model)
    plain: dict[str, Any] = {k: v.to(device) for k, v in family.model_inputs(batch.inputs).items()}
    positions = family.forward_positions(plain)  # [b, L + T] (InternVL) or None (the model's own)
    if positions is not None:
        plain["position_ids"] = positions
    if batch.groups_with_images and family.select_images is None:
        log_fallback(log, f"{family.name} cannot share vision features between rows: pixel_values per row")
        plain.update({k: v.to(device) for k, v in _row_pixels(groups, batch.rows).items()})
    elif batch.groups_with_images:
        plain["mm_encoder_outputs"] = _shared_image_features(model, family, groups, batch, device)
    t = batch.completion_ids.shape[1]
    hidden = _base(model)(**plain, use_cache=False).last_hidden_state  # [b, L + T, H]
    return CompletionStates(hidden[:, -(t + 1) : -1])  # [b, T, H]: position p predicts token p + 1


def chunked_logprobs(head: Any, states: CompletionStates, ids: Tensor, mask: Tensor, *, temperature: float,
                     suppress_ids: Sequence[int], chunk_tokens: int = CHUNK_TOKENS,
                     with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(log-probs [b, T], entropies [b, T] (detached) or None) of `ids` [b, T] where `mask` [b, T] is set (0
    elsewhere), the head applied to at most `chunk_tokens` positions at a time; with gradients enabled each chunk's
    logits are recomputed in the backward rather than kept."""
    b, t = ids.shape
    logp = torch.zeros(b, t, device=ids.device)  # [b, T]
    entropy = torch.zeros(b, t, device=ids.device) if with_entropy else None
    off = 0
    if states.first_logits is not None:  # token 0 from the prompt pass: [b, V], small
        lp0, scaled0 = token_logprobs(states.first_logits[:, None], ids[:, :1], temperature, suppress_ids)
        logp = torch.cat([lp0, logp[:, 1:]], dim=1)
        if entropy is not None:
            entropy[:, :1] = entropy_from_logits(scaled0.detach())
        off = 1
    where = mask[:, off:].reshape(-1).nonzero().squeeze(-1)  # [n]: the real tokens among positions off..T-1
    if where.numel() == 0 or off == t:
        return logp * mask, None if entropy is None else entropy * mask
    hidden = states.hidden.reshape(-1, states.hidden.shape[-1]).index_select(0, where)  # [n, H]
    targets = ids[:, off:].reshape(-1).index_select(0, where)  # [n]

    def chunk(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        lp, scaled = token_logprobs(head(h)[:, None], y[:, None], temperature, suppress_ids)  # [c, 1], [c, 1, V]
        ent = entropy_from_logits(scaled.detach())[:, 0] if with_entropy else lp.new_zeros(0)
        return lp[:, 0], ent  # [c], [c] or [0]

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    step = max(1, chunk_tokens)
    parts = [checkpoint(chunk, hidden[k : k + step], targets[k : k + step], use_reentrant=False) if recompute
             else chunk(hidden[k : k + step], targets[k : k + step]) for k in range(0, len(where), step)]
    flat_lp = torch.cat([p[0] for p in parts])  # [n]
    rest = torch.zeros(b * (t - off), device=ids.device, dtype=flat_lp.dtype).index_put((where,), flat_lp)
    logp = torch.cat([logp[:, :off], rest.view(b, t - off)], dim=1)  # [b, T]
    if entropy is not None:
        flat_ent = torch.cat([p[1] for p in parts]).to(entropy.dtype)
        entropy[:, off:] = torch.zeros(b * (t - off), device=ids.device).index_put((where,), flat_ent).view(b, -1)
    return logp * mask, None if entropy is None else entropy * mask


def use_shared_prefix(model: Any, requested: bool) -> bool:
    """Whether forwards of `model` take the shared-prefix layout: `requested` and the model can (see
    `vlrl.rollout.prefix.shared_prefix_unsupported`; otherwise the plain layout, logged once)."""
    if not requested:
        return False
    reason = shared_prefix_unsupported(model)
    if reason is not None:
        log_fallback(log, f"shared prefix off for {type(model).__name__} ({reason}): plain [prompt | completion] rows")
        return False
    return True


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float, suppress_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(log-probs of `ids` [b, T], the scaled + suppressed logits [b, T, V]) under softmax(logits / temperature)
    with the `suppress_ids` columns removed. Computed as gathered logit - logsumexp (no [b, T, V] log-softmax)."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    if suppress_ids:
        keep = torch.ones(scaled.shape[-1], dtype=torch.bool, device=scaled.device)
        keep[list(suppress_ids)] = False
        scaled = scaled.masked_fill(~keep, float("-inf"))  # [b, T, V]
    picked = scaled.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [b, T]
    return picked - torch.logsumexp(scaled, dim=-1), scaled  # [b, T], [b, T, V]


@dataclass
class RowLogprobs:
    """logp [b, T] (grad-carrying when computed with grad), mask [b, T], entropy [b, T] (detached) or None."""

    logp: Tensor
    mask: Tensor
    entropy: Tensor | None


# a pytree node: FSDP2 (vlrl.train.parallel) hooks its backward on the tensors of a forward's output
register_dataclass(RowLogprobs)


def row_logprobs(model: Any, groups: Sequence[Group], batch: RowBatch, *, temperature: float,
                 suppress_ids: Sequence[int], device: torch.device, with_entropy: bool = False,
                 chunk_tokens: int = CHUNK_TOKENS) -> RowLogprobs:
    """Per-token log-probs of the rows' completion tokens (entries at padding are 0 after masking)."""
    states = completion_states(model, groups, batch, device)
    ids = batch.completion_ids.to(device)  # [b, T]
    mask = batch.mask.to(device)  # [b, T]
    logp, entropy = chunked_logprobs(model.get_output_embeddings(), states, ids, mask, temperature=temperature,
                                     suppress_ids=suppress_ids, chunk_tokens=chunk_tokens, with_entropy=with_entropy)
    return RowLogprobs(logp, mask, entropy)


@torch.no_grad()
def rows_logprobs_nograd(model: Any, groups: Sequence[Group], rows: Sequence[Row], *, micro_batch_size: int,
                         temperature: float, suppress_ids: Sequence[int], device: torch.device, pad_id: int,
                         image_id: int, share_vision: bool = True, shared_prefix: bool = True,
                         chunk_tokens: int = CHUNK_TOKENS, spare: Group | None = None) -> list[Tensor]:
    """Log-probs of every row's completion (one `[T_r]` CPU tensor per row), `micro_batch_size` rows per forward
    (for the reference model and the old policy). `model`: a model or a wrapped root (`vlrl.train.parallel`); under
    FSDP2 every forward is a collective, so a rank with fewer micro-batches than another runs the rest on a row of
    `spare` and drops them. The model is put in eval mode for the pass (where activation checkpointing is off, so
    it does not stop the shared prefix)."""
    was_training = model.training
    model.eval()
    shared_prefix = use_shared_prefix(unwrap(model), shared_prefix)
    micro = max(1, micro_batch_size)
    order = length_order(groups, rows) if len(rows) > micro else list(range(len(rows)))
    out: list[Tensor] = [torch.zeros(0)] * len(rows)
    starts = list(range(0, len(rows), micro))
    rounds = matched_count(len(starts), model) if is_fsdp(model) else len(starts)
    kw: dict[str, Any] = dict(temperature=temperature, suppress_ids=suppress_ids, device=device,
                              chunk_tokens=chunk_tokens)
    try:
        for r in range(rounds):
            if r >= len(starts):  # another rank's micro-batch: take part in its gathers, keep nothing
                if spare is None:
                    raise RuntimeError("this rank sampled no group this step; use rollout.batch_size >= ranks")
                same_blocks(model, spare.prompt.pixel_values is not None)
                call(model, row_logprobs, [spare], build_rows([spare], [(0, 0)], pad_id, image_id, share_vision,
                                                              shared_prefix), **kw)
                continue
            part = order[starts[r] : starts[r] + micro]
            batch = build_rows(groups, [rows[i] for i in part], pad_id, image_id, share_vision, shared_prefix)
            same_blocks(model, any(groups[rows[i][0]].prompt.pixel_values is not None for i in part))
            res = call(model, row_logprobs, groups, batch, **kw)
            lengths = batch.mask.sum(-1).long().tolist()
            for j, (i, n) in enumerate(zip(part, lengths)):
                out[i] = res.logp[j, :n].float().cpu()
    finally:
        model.train(was_training)
    return out


def length_order(groups: Sequence[Group], rows: Sequence[Row]) -> list[int]:
    """A permutation of `rows` that keeps each group's rows together (its prompt is shared) and puts groups, and the
    rows inside a group, in order of completion length, so that micro-batches cut from it pad little."""
    length = [groups[g].completions[j].length for g, j in rows]
    longest: dict[int, int] = {}
    for (g, _), n in zip(rows, length):
        longest[g] = max(longest.get(g, 0), n)
    return sorted(range(len(rows)), key=lambda i: (longest[rows[i][0]], rows[i][0], length[i]))
