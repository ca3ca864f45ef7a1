"""Load any local Hugging Face VLM folder of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from vlrl.models.processor import load_processor

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> PreTrainedModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json); build one with `vlrl init-model`")
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {cfg.model_type!r} is not supported; valid: {', '.join(SUPPORTED_MODEL_TYPES)}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model


def load_model_and_processor(
    path: str | Path, dtype: torch.dtype = torch.float32, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[PreTrainedModel, Any]:
    return load_model(path, dtype), load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)


def vision_module(model: PreTrainedModel) -> torch.nn.Module:
    """The vision tower (including its merger) of a Qwen-VL model."""
    return model.model.visual  # type: ignore[no-any-return]


def merger_module(model: PreTrainedModel) -> torch.nn.Module:
    """The vision-language merger/projector: the only part trained in the `align` stage (Innovator-VL stage 1)."""
    return model.model.visual.merger  # type: ignore[no-any-return]
