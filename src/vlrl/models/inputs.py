"""Turn `Sample`s into model tensors: prompts for generation, prompt + target for SFT (labels masked
everywhere but the assistant answer), with each Qwen family's extras (`image_grid_thw`, `mm_token_type_ids`).
InternVL has neither: its pixel_values are whole tiles and its image tokens are `<IMG_CONTEXT>`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlrl.data.images import load_image
from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One sample as tensors. input_ids [L]; labels [L] (IGNORE_INDEX outside the target) or None;
    pixel_values [P, D] (Qwen-VL: patches) or [N, 3, H, W] (InternVL: tiles) or None; image_grid_thw [I, 3]
    (Qwen-VL) or None."""

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
        pixel_values=batch.get("pixel_values"),  # [P, D] or [N, 3, H, W]
        image_grid_thw=batch.get("image_grid_thw"),  # [I, 3] or None
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


def collate(items: Sequence[Encoded], pad_id: int, image_token_id: int, padding_side: str = "right",
            mm_token_type_ids: bool = True) -> dict[str, torch.Tensor]:
    """Pad to the longest item. Left padding for generation, right for training. `image_token_id`: the family's
    (`vlrl.models.processor.image_token_id`). `mm_token_type_ids` (1 at that token) for the families that take
    them: `family_of_processor(processor).mm_token_type_ids` (Qwen-VL's rope index reads them; InternVL's forward
    ignores them and its `generate` rejects them)."""
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
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
    if mm_token_type_ids:
        batch["mm_token_type_ids"] = (input_ids == image_token_id).long() * attention  # [B, L], 1 = image token
    if any(e.labels is not None for e in items):
        batch["labels"] = labels
    pix = [e.pixel_values for e in items if e.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)  # [sum P, D] or [sum N, 3, H, W]
    grids = [e.image_grid_thw for e in items if e.image_grid_thw is not None]
    if grids:
        batch["image_grid_thw"] = torch.cat(grids)  # [I, 3]
    return batch


def sample_images(sample: Sample) -> list[Image.Image]:
    """The sample's images, loaded under the data layer's pixel and decompression-bomb limits."""
    return [load_image(p) for p in sample.images]


def encode_for_sft(processor: Any, samples: Sequence[Sample]) -> list[Encoded]:
    """Prompt + demonstration of each sample, labels on the demonstration only."""
    return [encode_sft(processor, s.messages, sample_images(s), sft_response(s)) for s in samples]


def encode_for_sft_cached(
    processor: Any, samples: Sequence[Sample], indices: Sequence[int], cache: dict[int, Encoded] | None
) -> list[Encoded]:
    """`encode_for_sft` of `samples[i] for i in indices`, each sample encoded once per `cache` (a dict the caller
    keeps for the run: SFT sees every sample once per epoch, so templating and image processing need not be
    repeated). The cache holds every sample's pixel values (fp32). `cache=None`: no caching."""
    if cache is None:
        return encode_for_sft(processor, [samples[i] for i in indices])
    missing = [i for i in dict.fromkeys(indices) if i not in cache]
    cache.update(zip(missing, encode_for_sft(processor, [samples[i] for i in missing])))
    return [cache[i] for i in indices]


def encode_for_generation(processor: Any, samples: Sequence[Sample]) -> list[Encoded]:
    """The prompt of each sample, for generation."""
    return [encode_prompt(processor, s.messages, sample_images(s)) for s in samples]
