"""`vlrl export`: a checkpoint as a plain Hugging Face folder (safetensors, config, processor) that
`AutoModelForImageTextToText.from_pretrained` loads, LoRA adapters merged into their base. A sharded checkpoint
(`checkpoint_format: sharded`) is read in this one process: the model built from its config, the weights from its
torch.distributed.checkpoint files, whatever number of ranks wrote them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PreTrainedModel

from vlrl.models.loading import SHARDED_STATE, is_sharded_checkpoint, load_model
from vlrl.models.processor import load_processor

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
                      base: str | Path | None = None) -> Path:
    """Write `checkpoint` (a model folder, a sharded checkpoint, or an adapter checkpoint merged into `base` or the
    base it names) to `out` in `dtype`; `out` must not exist yet or be empty (a finished export is never
    overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    if is_sharded_checkpoint(checkpoint):
        model = load_sharded_model(checkpoint, EXPORT_DTYPES[dtype])
    else:
        model = load_model(checkpoint, EXPORT_DTYPES[dtype], base=base)
    processor = load_processor(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_sharded_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of a sharded checkpoint, in this process alone (no process group, even inside a distributed
    run): built from the checkpoint's config, then every weight and buffer it saved read from its shard files
    (the optimizer's state there is not read). Strict: a tensor the files lack is an error, not a fresh init."""
    import torch.distributed.checkpoint as dcp

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if (checkpoint / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    # the trainer saves its wrapper's state (vlrl.train.parallel.Root): the model's own names under `model.`;
    # state_dict's tensors share the parameters' storage, so the load fills the model in place
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # it says it assumes one process: this load's intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=checkpoint / SHARDED_STATE, no_dist=True)
    return model.to(dtype)
