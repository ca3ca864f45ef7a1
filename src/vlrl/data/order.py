"""A deterministic order of training samples that any world size and any resume point reproduce."""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of `n` samples in `epoch` (torch's generator: the same order on every machine)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of the samples of global batch `step`: positions step*B ... (step+1)*B-1 of the endless
    concatenation of shuffled epochs. Depends only on (step, B, n, seed): resume needs no iterator state."""
    out: list[int] = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if i == 0 or not out:
            order = epoch_order(n, seed, epoch)
        out.append(order[i])
    return out


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a global batch: contiguous, sizes differing by at most one (the first len % world ranks
    take one more), so every rank has some as soon as there are as many items as ranks."""
    per, extra = divmod(len(indices), world)
    lo = rank * per + min(rank, extra)
    return indices[lo : lo + per + (1 if rank < extra else 0)]
