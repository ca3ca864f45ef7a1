"""Groups of random completions over given prompts, for log-prob parity tests (imported by tests in this folder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded
from vlrl.models.processor import vision_token_ids
from vlrl.rollout.types import Completion, Group


def random_groups(processor: Any, samples: Sequence[Sample], encoded: Sequence[Encoded],
                  lengths: Sequence[Sequence[int]], seed: int = 0) -> list[Group]:
    """One group per encoded prompt, completions of the given lengths drawn from ordinary (non-vision) tokens;
    prompt k keeps sample k (the last sample for the prompts beyond them)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = [i for i in range(40, 1000) if i not in vision_token_ids(processor.tokenizer)]
    groups = []
    for k, (enc, row_lengths) in enumerate(zip(encoded, lengths)):
        comps = []
        for n in row_lengths:
            ids = torch.tensor([vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=gen)])
            comps.append(Completion(ids, "", torch.zeros(n), truncated=False))
        groups.append(Group(samples[min(k, len(samples) - 1)], enc, comps))
    return groups
