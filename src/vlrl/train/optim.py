"""Optimizer, learning-rate schedule and the choice of trainable parameters, shared by SFT and RL."""

from __future__ import annotations

import math

import torch

from vlrl.models.loading import merger_module, vision_module


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_trainable(model: torch.nn.Module, stage: str, freeze_vision: bool = False, freeze_merger: bool = False) -> list[torch.nn.Parameter]:
    """`align`: only the vision-language merger trains (Innovator-VL stage 1). `full`: everything,
    minus the vision tower (its merger included only if `freeze_merger`) when `freeze_vision`."""
    if stage not in ("align", "full"):
        raise ValueError(f"unknown stage {stage!r}; valid: align, full")
    merger = merger_module(model)  # type: ignore[arg-type]
    merger_ids = {id(p) for p in merger.parameters()}
    vision_ids = {id(p) for p in vision_module(model).parameters()} - merger_ids  # type: ignore[arg-type]
    for p in model.parameters():
        if stage == "align":
            p.requires_grad_(id(p) in merger_ids)
        else:
            frozen = (freeze_vision and id(p) in vision_ids) or (freeze_merger and id(p) in merger_ids)
            p.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters). The fused kernel (one pass per
    tensor) on CPU and CUDA, as transformers' Trainer defaults to: faster than the per-tensor loop
    (benchmarks/README.md)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def make_scheduler(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warmup_steps, total_steps, min_ratio))
