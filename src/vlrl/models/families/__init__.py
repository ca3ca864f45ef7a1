"""Model families: one record per family, looked up by the HF `model_type`; what differs between families lives
in one module per family, whose functions the record names.

qwen-vl (`families/qwen_vl.py`): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (`model.model.visual`, its `merger` the
projector; M-RoPE positions from the model's rope index; one vision output per image, deepstack on Qwen3-VL).
internvl (`families/internvl.py`, also the tiny builder and the image-only processor): transformers' own
`InternVLForConditionalGeneration` (the HF-format InternVL3 / InternVL3.5 checkpoints: `model.model.vision_tower` +
`model.model.multi_modal_projector`, a Qwen2 / Qwen3 text model; 1-D positions; one vision output per tile).

The rollout engine (`vlrl.rollout.hf_engine`, `vlrl.rollout.prefix`, `vlrl.rollout.lean_step`) and the training
forwards (`vlrl.train.logprobs`) ask the record instead of knowing any family. A speed path that a family (or a
model) cannot take is left for the plain path, logged once (`log_fallback`), never replaced by other math.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlrl.models.families import internvl, qwen_vl
from vlrl.models.families.internvl import (
    INTERNVL_NAMED_TOKENS,
    INTERNVL_SPECIAL_TOKENS,
    INTERNVL_VISION_TOKENS,
)
from vlrl.models.families.slots import ImageSlot
from vlrl.models.tokenizer import VISION_TOKENS

if TYPE_CHECKING:
    from vlrl.models.inputs import Encoded


@dataclass(frozen=True)
class Family:
    """One model family.

    image_token: the placeholder the processor expands and the model fills with vision features; vision_tokens:
        tokens a model must never sample; vision(model): the vision side (tower and projector); merger(model): the
        vision-language projector alone (the `align` stage trains only it).
    forward_keys: the batch entries the model's forward takes (`model_inputs` drops the others).
    prompt_positions(model, inputs): (position_ids of left-padded prompts [.., U, L], next_pos [U]: the position
        of the first token after each prompt); text_positions(next_pos [b], start, count): positions of the text
        tokens start .. start + count - 1 after each row's prompt; forward_positions(inputs): position_ids of a
        full forward over (padded) rows, None when the model computes them itself.
    encode_images(model, prompts, device): one vision output for all the prompts' images; image_units(prompt):
        how many of its entries belong to `prompt`; select_images(output, index): the output at those entries
        (for `mm_encoder_outputs`), None when the family cannot share vision features between rows.
    text_decoder(model): the text decoder `LeanStep` re-lays, None when its math does not cover this model's.
    image_slot(processor, width, height): what the family's processor makes of an image of that size, without
        processing it (`ImageSlot`: resized size, tiles, image tokens, the text that replaces the image token;
        the token-budget audit reads it).
    """

    name: str
    model_types: tuple[str, ...]
    image_token: str
    vision_tokens: tuple[str, ...]
    vision: Callable[[nn.Module], nn.Module]
    merger: Callable[[nn.Module], nn.Module]
    forward_keys: tuple[str, ...]
    prompt_positions: Callable[[Any, dict[str, Tensor]], tuple[Tensor, Tensor]]
    text_positions: Callable[[Tensor, int, int], Tensor]
    forward_positions: Callable[[dict[str, Tensor]], Tensor | None]
    encode_images: Callable[[Any, Sequence[Encoded], torch.device], Any]
    image_units: Callable[[Encoded], int]
    select_images: Callable[[Any, Sequence[int]], Any] | None
    text_decoder: Callable[[nn.Module], nn.Module | None]
    image_slot: Callable[[Any, int, int], ImageSlot]

    @property
    def mm_token_type_ids(self) -> bool:
        """Whether the model's inputs carry `mm_token_type_ids` (Qwen-VL's rope index reads them; InternVL's
        `generate` rejects them)."""
        return "mm_token_type_ids" in self.forward_keys

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of `batch` this family's forward takes, in their order."""
        return {k: v for k, v in batch.items() if k in self.forward_keys}


QWEN_VL = Family(
    name="qwen-vl",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    image_token="<|image_pad|>",
    vision_tokens=tuple(VISION_TOKENS),
    vision=qwen_vl.vision,
    merger=qwen_vl.merger,
    forward_keys=qwen_vl.FORWARD_KEYS,
    prompt_positions=qwen_vl.prompt_positions,
    text_positions=qwen_vl.text_positions,
    forward_positions=qwen_vl.forward_positions,
    encode_images=qwen_vl.encode_images,
    image_units=qwen_vl.image_units,
    select_images=qwen_vl.select_images,
    text_decoder=qwen_vl.text_decoder,
    image_slot=qwen_vl.image_slot,
)
INTERNVL = Family(
    name="internvl",
    model_types=("internvl",),
    image_token=INTERNVL_NAMED_TOKENS["context_image_token"],
    vision_tokens=tuple(INTERNVL_VISION_TOKENS),
    vision=internvl.vision,
    merger=internvl.merger,
    forward_keys=internvl.FORWARD_KEYS,
    prompt_positions=internvl.prompt_positions,
    text_positions=internvl.text_positions,
    forward_positions=internvl.forward_positions,
    encode_images=internvl.encode_images,
    image_units=internvl.image_units,
    select_images=internvl.select_images,
    text_decoder=internvl.text_decoder,
    image_slot=internvl.image_slot,
)
FAMILIES = (QWEN_VL, INTERNVL)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family:
    """The family of an HF `model_type` (config.json's)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"model_type {model_type!r} is not supported; valid: {', '.join(SUPPORTED_MODEL_TYPES)}")


def family_of_model(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    return family_of(str(getattr(config, "model_type", "")))


def family_of_image_token(image_token: str) -> Family:
    """The family whose image placeholder is `image_token` (a processor's `image_token`)."""
    for family in FAMILIES:
        if family.image_token == image_token:
            return family
    raise ValueError(f"image token {image_token!r} is no family's; valid: {', '.join(f.image_token for f in FAMILIES)}")


_LOGGED: set[tuple[str, str]] = set()


def log_fallback(log: logging.Logger, message: str) -> None:
    """Log at INFO that a speed path falls back to the plain one, the first time `message` comes from `log`'s
    module in this process (a rollout or a micro-batch repeats the decision every step)."""
    key = (log.name, message)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message)


__all__ = [
    "Family", "FAMILIES", "ImageSlot", "INTERNVL", "QWEN_VL", "SUPPORTED_MODEL_TYPES", "family_of", "family_of_model",
    "family_of_image_token", "log_fallback",
    "INTERNVL_NAMED_TOKENS", "INTERNVL_SPECIAL_TOKENS", "INTERNVL_VISION_TOKENS",
]  # fmt: skip
