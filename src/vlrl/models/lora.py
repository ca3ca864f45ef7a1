"""LoRA adapters through peft: which linear layers get them, adding them for training, and reading an adapter
checkpoint back (to train on, or merged into its base model).

An adapter checkpoint is peft's own folder (`adapter_config.json`, `adapter_model.safetensors`) beside the
processor; its `base_model_name_or_path` is the base model's absolute path, so `vlrl eval`, `vlrl export` and a
resumed run find the base without being told (`base=` overrides it when the folder has moved).

Training code works on the Hugging Face model with the adapters injected in place (`PeftModel.get_base_model()`),
so every forward, family lookup and engine sees the model type it knows; the `PeftModel` is kept for what only it
does: `save_pretrained` of the adapters and `disable_adapter()` (the reference model of a KL penalty is the same
model with its adapters off: no second copy).

Under FSDP2 (`parallel: fsdp`) the blocks of that model are sharded with their adapters inside them (frozen and
trainable parameters in one group); `disable_adapter()` only switches the adapter layers off, so the reference pass
gathers the same blocks in the same order on every rank. A checkpoint gathers the adapters alone (`is_adapters`
tells the harness) and rank 0 writes the same folder as in one process, which resumes at any world size.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrl.models.families import family_of_model

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """`lora:` in sft and rl. VLM-R1's REC recipe: r 64, alpha 128, dropout 0.05, vision tower frozen."""

    r: int = 0  # adapter rank; 0: no adapters (every selected weight trains)
    alpha: int = 16  # scale alpha / r of the adapters' update
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # linear layers by last name
    vision: bool = False  # adapters on the vision tower's (and merger's) linear layers too; false: it stays frozen

    @property
    def enabled(self) -> bool:
        return self.r > 0


def check_lora(key: str, cfg: LoRAConfig) -> None:
    """ValueErrors naming the key, before anything loads."""
    if cfg.r < 0:
        raise ValueError(f"{key}.r must be >= 0 (0: off), got {cfg.r}")
    if cfg.enabled and not cfg.alpha > 0:
        raise ValueError(f"{key}.alpha must be > 0, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"{key}.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.enabled and not cfg.target_modules:
        raise ValueError(f"{key}.target_modules must name at least one linear layer")


def lora_targets(model: Any, cfg: LoRAConfig) -> list[str]:
    """Full names of the `nn.Linear` modules whose last name is in `cfg.target_modules`, outside the vision side
    unless `cfg.vision`."""
    vision = {id(m) for m in family_of_model(model).vision(model).modules()}
    wanted = set(cfg.target_modules)
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in wanted
            and (cfg.vision or id(m) not in vision)]


def add_lora(model: Any, cfg: LoRAConfig, base_path: str | Path) -> Any:
    """A `PeftModel` of `model` with fresh adapters (only they train; everything else is frozen)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, cfg)
    if not targets:
        raise ValueError(f"lora.target_modules {cfg.target_modules} match no linear layer of "
                         f"{type(model).__name__}")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          base_model_name_or_path=str(Path(base_path).resolve()))
    return get_peft_model(model, peft_cfg)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model folder an adapter checkpoint names."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: not a readable adapter config: {err}") from None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{file}: no base_model_name_or_path; give the base model folder (base=)")
    return base


def load_adapters(model: Any, path: str | Path, trainable: bool) -> Any:
    """A `PeftModel` of `model` with the adapters of checkpoint `path` (trainable or not)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def is_adapters(model: Any) -> bool:
    """Whether `model` is a peft model (what a LoRA run saves: its adapters)."""
    peft = sys.modules.get("peft")  # not imported: no peft model exists (and a run without LoRA never imports it)
    return peft is not None and isinstance(model, peft.PeftModel)
