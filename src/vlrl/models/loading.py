"""Load any local Hugging Face VLM folder of a supported family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from vlrl.models.families import SUPPORTED_MODEL_TYPES, family_of_model
from vlrl.models.lora import adapter_base, is_adapter_folder, load_adapters
from vlrl.models.processor import load_processor

# the subfolder of a sharded checkpoint (`checkpoint_format: sharded`) that holds torch.distributed.checkpoint's
# per-rank files of the model and optimizer state; the checkpoint folder itself has the config and processor only
SHARDED_STATE = "sharded"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_STATE / ".metadata").exists()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               base: str | Path | None = None) -> PreTrainedModel:
    """The model of folder `path`; a LoRA adapter checkpoint (`vlrl.models.lora`) comes back merged into its base
    model (the one its adapter config names, or `base`). A sharded checkpoint is refused (`vlrl export` it)."""
    path = Path(path)
    if is_adapter_folder(path):
        model = load_model(base or adapter_base(path), dtype, attn_implementation)
        return load_adapters(model, path, trainable=False).merge_and_unload()
    if is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded checkpoint (checkpoint_format: sharded): its weights are split into "
                         "per-rank files that only a training run resumes from; write a Hugging Face folder with "
                         f"`vlrl export --checkpoint {path} --out DIR` and load that")
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
    """The vision side, projector included: Qwen-VL's `model.visual` (its merger inside); InternVL's
    `vision_tower` and `multi_modal_projector` (in one ModuleList that holds the model's own modules)."""
    return family_of_model(model).vision(model)


def merger_module(model: PreTrainedModel) -> torch.nn.Module:
    """The vision-language merger/projector: the only part trained in the `align` stage (Innovator-VL stage 1).
    Qwen-VL: `model.visual.merger`; InternVL: `model.multi_modal_projector`."""
    return family_of_model(model).merger(model)
