"""The policy a run trains: the model (with LoRA adapters injected when `lora.r > 0`), its processor, and the
parameters the optimizer updates.

Without LoRA, the model comes from `start_from` (the start model, or the checkpoint a resumed run continues from)
and `set_trainable` picks the parameters. With LoRA the base weights are frozen and only the adapters train: a
fresh run adds adapters to the start model, a resumed one loads its checkpoint's adapters onto their base
(`vlrl.models.lora`), and checkpoints hold the adapters only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlrl.models.loading import load_model
from vlrl.models.lora import LoRAConfig, adapter_base, add_lora, load_adapters
from vlrl.models.processor import load_processor


@dataclass
class Policy:
    model: Any  # the Hugging Face model that trains (adapters injected in place under LoRA)
    processor: Any
    adapters: Any = None  # LoRA: the peft model (save_pretrained of the adapters, disable_adapter()); else None

    @property
    def to_save(self) -> Any:
        """What a checkpoint writes with `save_pretrained`: the adapters under LoRA, else the whole model."""
        return self.adapters if self.adapters is not None else self.model

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def load_policy(start_model: str, start_from: str, resuming: bool, dtype: torch.dtype, lora: LoRAConfig,
                min_pixels: int | None = None, max_pixels: int | None = None) -> Policy:
    """The policy of a run that starts from `start_model` and now loads `start_from` (the same folder, or a
    checkpoint when `resuming`)."""
    processor = load_processor(start_from, min_pixels=min_pixels, max_pixels=max_pixels)
    if not lora.enabled:
        return Policy(load_model(start_from, dtype), processor)
    if resuming:  # the checkpoint holds adapters; their base is the start model (merged, if it was itself adapters)
        peft = load_adapters(load_model(adapter_base(start_from), dtype), start_from, trainable=True)
    else:
        peft = add_lora(load_model(start_model, dtype), lora, start_model)
    return Policy(peft.get_base_model(), processor, peft)
