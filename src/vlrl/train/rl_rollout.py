"""The rollout and score stages of an RL step: draw prompts, sample G completions each, score them, and
(DAPO) drop zero-variance groups and refill.

Distribution: every draw of k prompts is the same on every rank (positions `position .. position + k - 1`
of the endless shuffled-epoch stream, `data/order.py`); each rank samples a contiguous share of them,
whole groups, with per-prompt seeds `mix_seed(run seed, position)`. Which groups are kept is decided from
all-reduced per-group flags, so every rank agrees on the step's global group order. A prompt's completions
depend on (run seed, its position, the weights) only: the same on any world size and after a resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlrl.data.order import epoch_order, shard
from vlrl.data.recheck import recheck_images
from vlrl.data.sample import Sample
from vlrl.rewards.registry import RewardSpec, combine
from vlrl.rollout.base import RolloutEngine
from vlrl.rollout.sampler import mix_seed
from vlrl.rollout.types import Group, SamplingParams
from vlrl.train.dist import DistInfo, all_reduce_sum, is_distributed


@dataclass
class StepRollouts:
    """This rank's share of one step's rollouts.

    groups: this rank's groups, in global order; gids: each one's index in the step's global batch
        (0 .. n_groups - 1 over all ranks, contiguous per rank).
    n_groups: groups in the step over all ranks (B, or fewer when dynamic sampling ran out of tries).
    scores [n_local * G] float64: weighted total reward per local row (row = gid-major, then completion);
        NaN where no reward could score the completion (every reward returned None).
    per_reward: raw values of each reward (key = spec label) per local row.
    metrics: `dynamic/*`, `frac_zero_std_groups` and `reward/sampled_mean` (over every group sampled this
        step, kept or not), `time/rollout`, `time/reward`.
    """

    groups: list[Group]
    gids: list[int]
    n_groups: int
    scores: Tensor  # [n_local * G]
    per_reward: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)
    spare: Group | None = None  # a group this rank sampled (kept or not): the input of the zero-weight forwards
    #   that keep ranks' collectives matched under ddp / fsdp when a rank has fewer micro-batches than another


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Sample indices at positions start .. start + count - 1 of the endless concatenation of shuffled
    epochs (the order `global_batch` uses: `global_batch(s, B, n, seed) == stream_indices(s * B, B, n, seed)`)."""
    out: list[int] = []
    order: list[int] = []
    current = -1
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch != current:
            order, current = epoch_order(n, seed, epoch), epoch
        out.append(order[i])
    return out


def score_groups(groups: Sequence[Group], specs: Sequence[RewardSpec], runner: Any = None
                 ) -> tuple[Tensor, dict[str, list[float | None]]]:
    """Weighted reward per row `[n * G]` (float64) and each reward's raw values, via the rewards registry.

    The trainer passes `completion_lengths` (token counts, stop token included) to every reward that takes it
    (DAPO's `overlong`). A row that no reward could score is NaN (left out of baselines, advantage 0)."""
    completions = [c.text for g in groups for c in g.completions]
    if not completions:
        return torch.zeros(0, dtype=torch.float64), {s.key: [] for s in specs}
    rows: list[Sample] = [g.sample for g in groups for _ in g.completions]
    lengths = [c.length for g in groups for c in g.completions]
    total, per_reward, _ = combine(specs, completions, rows, runner=runner, completion_lengths=lengths)
    scores = torch.tensor(total, dtype=torch.float64)  # [n * G]
    unscored = torch.tensor([all(v[i] is None for v in per_reward.values()) for i in range(len(total))])
    scores[unscored] = float("nan")
    return scores, per_reward


def zero_variance(scores: Tensor, group_size: int) -> Tensor:
    """`[n * G] -> [n]` bool: the group's scorable rewards are all equal (or fewer than two are scorable)."""
    grouped = scores.view(-1, group_size)  # [n, G]
    finite = ~torch.isnan(grouped)
    hi = torch.where(finite, grouped, torch.full_like(grouped, -math.inf)).max(dim=1).values
    lo = torch.where(finite, grouped, torch.full_like(grouped, math.inf)).min(dim=1).values
    return (finite.sum(dim=1) < 2) | (hi - lo <= 1e-9)


def _global_flags(local: Tensor, mine: list[int], k: int) -> Tensor:
    """Every rank's per-group flags placed at their draw positions: `[k]` bool on every rank."""
    flags = torch.zeros(k, dtype=torch.float64)
    if mine:
        flags[torch.tensor(mine)] = local.to(torch.float64)
    return all_reduce_sum(flags) > 0.5


@dataclass
class RolloutSpec:
    """What `collect` needs beyond the engine: B, G, sampling, rewards, dynamic sampling, the run seed."""

    batch_size: int
    group_size: int
    sampling: SamplingParams
    rewards: list[RewardSpec]
    seed: int
    dynamic_sampling: bool = False
    dynamic_max_tries: int = 4
    runner: Any = None
    skip_invalid: bool = False  # a sample whose image no longer loads is replaced and counted (`vlrl.data.recheck`)


def collect(engine: RolloutEngine, samples: Sequence[Sample], spec: RolloutSpec, info: DistInfo,
            position: int) -> tuple[StepRollouts, int]:
    """Sample and score B groups from data position `position`; returns them and the next position.

    With `dynamic_sampling` (DAPO, Yu et al. 2025, arXiv 2503.14476, section 3.2) groups whose rewards are
    all equal are dropped and more prompts are drawn (the shortfall each time) until B groups are kept or
    `dynamic_max_tries` draws were made; the step then trains on what it kept (fewer than B groups), or, if
    nothing was kept at all, on the last draw (its advantages are zero). verl instead raises an error when
    its `max_num_gen_batches` is exhausted and draws whole batches each time.
    """
    G, B = spec.group_size, spec.batch_size
    kept: list[tuple[int, Group, Tensor, dict[str, list[float | None]]]] = []
    n_kept = tries = drawn = n_zero = n_bad_images = 0
    t_roll = t_reward = 0.0
    sampled = torch.zeros(2, dtype=torch.float64)  # sum and count of the scorable rewards of every draw
    last: list[tuple[int, Group, Tensor, dict[str, list[float | None]]]] = []
    spare: Group | None = None
    while True:
        k = B if tries == 0 else B - n_kept
        tries += 1
        idx = stream_indices(position, k, len(samples), spec.seed)
        mine = shard(list(range(k)), info.rank, info.world_size)
        t = time.perf_counter()
        picked, n_bad = recheck_images([samples[idx[i]] for i in mine], samples, spec.skip_invalid)
        n_bad_images += n_bad
        groups = engine.generate(picked, G, spec.sampling,
                                 seeds=[mix_seed(spec.seed, position + i) for i in mine])
        t_roll += time.perf_counter() - t
        spare = spare or (groups[0] if groups else None)
        t = time.perf_counter()
        scores, per = score_groups(groups, spec.rewards, spec.runner)
        t_reward += time.perf_counter() - t
        finite = scores[~torch.isnan(scores)]
        sampled += torch.tensor([float(finite.sum()), float(finite.numel())], dtype=torch.float64)
        zero = _global_flags(zero_variance(scores, G), mine, k)  # [k]
        position, drawn, n_zero = position + k, drawn + k, n_zero + int(zero.sum())
        keep = [i for i in range(k) if not (spec.dynamic_sampling and bool(zero[i]))][: B - n_kept]
        rank_of = {i: n_kept + r for r, i in enumerate(keep)}
        last = []
        for li, i in enumerate(mine):
            rows = slice(li * G, (li + 1) * G)
            item = (rank_of.get(i, i), groups[li], scores[rows], {key: v[rows] for key, v in per.items()})
            last.append(item)
            if i in rank_of:
                kept.append(item)
        n_kept += len(keep)
        if not spec.dynamic_sampling or n_kept >= B or tries >= spec.dynamic_max_tries:
            break
    fallback = n_kept == 0
    if fallback:  # nothing had signal: train on the last draw so every rank still takes a step
        kept, n_kept = last, k
    kept.sort(key=lambda item: item[0])
    per_reward = {s.key: [v for item in kept for v in item[3][s.key]] for s in spec.rewards}
    metrics = {"time/rollout": t_roll, "time/reward": t_reward, "frac_zero_std_groups": n_zero / max(1, drawn),
               "dynamic/tries": float(tries), "dynamic/prompts": float(drawn), "dynamic/kept_groups": float(n_kept),
               "dynamic/fallback": float(fallback)}
    metrics["data/skipped_images"] = float(all_reduce_sum(torch.tensor([float(n_bad_images)]))[0])
    total, count = all_reduce_sum(sampled).tolist()
    metrics["reward/sampled_mean"] = total / max(1.0, count)
    scores_all = torch.cat([item[2] for item in kept]) if kept else torch.zeros(0, dtype=torch.float64)
    out = StepRollouts([item[1] for item in kept], [item[0] for item in kept], n_kept, scores_all, per_reward, metrics,
                       spare)
    return out, position


def gather_rows(local: Tensor, gids: Sequence[int], n_groups: int, group_size: int) -> Tensor:
    """Assemble per-row values `[n_local * G]` of every rank into the global `[n_groups * G]` on every rank
    (rows of group gid at gid * G .. gid * G + G - 1). NaN survives (each slot is filled by one rank)."""
    out = torch.zeros(n_groups, group_size, dtype=torch.float64)
    if gids:
        out[torch.tensor(list(gids))] = local.to(torch.float64).view(-1, group_size)
    return all_reduce_sum(out).view(-1)  # [n_groups * G]


def all_reduce_max(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
