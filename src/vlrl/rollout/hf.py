"""In-process generation with Hugging Face `generate` (KV cache), vision tokens suppressed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlrl.data.sample import Sample
from vlrl.models.inputs import collate, encode_for_generation
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.types import SamplingParams


@torch.no_grad()
def generate_texts(model: Any, processor: Any, samples: Sequence[Sample], sampling: SamplingParams,
                   device: torch.device | str = "cpu") -> list[list[str]]:
    """`sampling.n` completions per sample, decoded with special tokens skipped (tags survive: they are
    ordinary added tokens). Returns one list of n strings per sample."""
    tok = processor.tokenizer
    encoded = encode_for_generation(processor, samples)
    batch = collate(encoded, tok.pad_token_id, image_token_id(processor), padding_side="left")
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.n,
        suppress_tokens=vision_token_ids(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    out = model.generate(**batch, **kwargs)  # [B*n, L + T]
    completions = out[:, batch["input_ids"].shape[1] :]  # [B*n, T]
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    return [texts[i * sampling.n : (i + 1) * sampling.n] for i in range(len(samples))]
