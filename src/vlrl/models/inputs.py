"""Turn `Sample`s into model tensors: prompts for generation, prompt + target for SFT (labels masked
everywhere but the assistant answer), with each Qwen family's extras (`image_grid_thw`, `mm_token_type_ids`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One sample as tensors. input_ids [L]; labels [L] (IGNORE_INDEX outside the target) or None;
    pixel_values [P, D] or None; image_grid_thw [I, 3] or None."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def to_chat(messages: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """String contents with `<image>` placeholders -> HF chat content lists, images kept in position."""
    chat = []
    for m in messages:
        parts = m["content"].split(IMAGE_PLACEHOLDER)
        content: list[dict[str, Any]] = []
        for i, part in enumerate(parts):
            if i > 0:
                content.append({"type": "image"})
            if part:
                content.append({"type": "text", "text": part})
        chat.append({"role": m["role"], "content": content})
    return chat


def prompt_text(processor: Any, messages: Sequence[dict[str, str]]) -> str:
    return str(processor.apply_chat_template(to_chat(messages), tokenize=False, add_generation_prompt=True))


def encode_prompt(processor: Any, messages: Sequence[dict[str, str]], images: list[Image.Image]) -> Encoded:
    """Chat template applied, each image's placeholder expanded to its vision tokens."""
    text = prompt_text(processor, messages)
    batch = processor(text=[text], images=images or None, padding=False, return_tensors="pt")
    return Encoded(
        input_ids=batch["input_ids"][0],  # [L]
        labels=None,
        pixel_values=batch.get("pixel_values"),  # [P, D]
        image_grid_thw=batch.get("image_grid_thw"),  # [I, 3]
    )


def target_ids(processor: Any, response: str) -> torch.Tensor:
    """The assistant answer's token ids, ending with <|im_end|> so the model learns to stop."""
    tok = processor.tokenizer
    ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)  # [T]


def sft_response(sample: Sample) -> str:
    """The SFT target: the data's demonstration, else the answer in `<answer>` tags."""
    return sample.response if sample.response is not None else f"<answer>{sample.answer}</answer>"


def encode_sft(processor: Any, messages: Sequence[dict[str, str]], images: list[Image.Image], response: str) -> Encoded:
    """Prompt + target; labels are IGNORE_INDEX on the prompt (assistant-only loss)."""
    enc = encode_prompt(processor, messages, images)
    tgt = target_ids(processor, response)
    enc.labels = torch.cat([torch.full_like(enc.input_ids, IGNORE_INDEX), tgt])  # [L + T]
    enc.input_ids = torch.cat([enc.input_ids, tgt])  # [L + T]
    return enc


def collate(items: Sequence[Encoded], pad_id: int, image_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest item. Left padding for generation, right for training."""
    n, length = len(items), max(len(e.input_ids) for e in items)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((n, length), dtype=torch.long)  # [B, L]
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    for i, e in enumerate(items):
        k = len(e.input_ids)
        sl = slice(length - k, length) if padding_side == "left" else slice(0, k)
        input_ids[i, sl] = e.input_ids
        attention[i, sl] = 1
        if e.labels is not None:
            labels[i, sl] = e.labels
    batch: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": (input_ids == image_token_id).long() * attention,  # [B, L], 1 = image token
    }
    if any(e.labels is not None for e in items):
        batch["labels"] = labels
    pix = [e.pixel_values for e in items if e.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)  # [sum P, D]
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in items if e.image_grid_thw is not None])
    return batch
