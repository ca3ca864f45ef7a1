"""`vlrl export`: a checkpoint as a plain Hugging Face folder (safetensors, config, processor) that
`AutoModelForImageTextToText.from_pretrained` loads, LoRA adapters merged into their base."""

from __future__ import annotations

from pathlib import Path

import torch

from vlrl.models.loading import load_model
from vlrl.models.processor import load_processor

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
                      base: str | Path | None = None) -> Path:
    """Write `checkpoint` (a model folder, or an adapter checkpoint merged into `base` or the base it names) to
    `out` in `dtype`; `out` must not exist yet or be empty (a finished export is never overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    model = load_model(checkpoint, EXPORT_DTYPES[dtype], base=base)
    processor = load_processor(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
