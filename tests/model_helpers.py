"""Helpers on the built-in tiny model shared by test folders."""

from __future__ import annotations

import torch


def jitter_text_weights(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """`model` with the 2-D text weights of the random tiny model jittered (a fixed seed), in place: its greedy
    answers then differ from prompt to prompt (the untouched random model repeats one token for every prompt)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "visual" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model
