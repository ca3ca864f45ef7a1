"""Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): what the rollout engine and the training forwards ask of this family
(the tiny builder and the image-only processor are in `vlrl.models.build` / `vlrl.models.processor`).

Modules: the vision side is `model.model.visual`, its `merger` the projector; the text decoder
`model.model.language_model` (Qwen2 / Qwen3 layers, which `vlrl.rollout.lean_step.LeanStep` re-lays).

Positions: 3-D multimodal rotary positions (M-RoPE). The prompt's come from the model's own `get_rope_index` (left
padding respected; it reads `mm_token_type_ids` and `image_grid_thw`, which the forward therefore takes); every
token after the prompt is text, whose position continues 1-D on all three axes from `next_pos` = the prompt's
largest position + 1 = (its real length + its rope delta). That is what `get_rope_index` gives over the whole
sequence (tests/train/test_train_shared_prefix.py checks it). On those text positions M-RoPE is the plain 1-D
rotary embedding. A full forward computes its positions itself.

Images: `get_image_features(pixel_values, image_grid_thw)` returns one feature tensor per image (`pooler_output`,
a tuple) and, on Qwen3-VL, one such tuple per deepstack layer (`deepstack_features`); a prompt has one
`image_grid_thw` row per image. The processor resizes an image to multiples of patch x merge within its min/max
pixels (`size` shortest/longest edge) and writes (h / patch) x (w / patch) / merge^2 `<|image_pad|>` for it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlrl.data.resize import smart_resize
from vlrl.models.families.slots import ImageSlot

if TYPE_CHECKING:
    from vlrl.models.inputs import Encoded

FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def vision(model: nn.Module) -> nn.Module:
    return model.get_submodule("model.visual")


def merger(model: nn.Module) -> nn.Module:
    return model.get_submodule("model.visual.merger")


def prompt_positions(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(position_ids [3, U, L] of the left-padded prompts, next_pos [U]: the position of the first token after
    each prompt). Text-only prompts get 1-D positions counted over their real tokens, as `generate` does."""
    mask = inputs["attention_mask"]  # [U, L]
    lengths = mask.sum(-1)  # [U]
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        pos, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                 image_grid_thw=grid, attention_mask=mask)
        return pos, lengths + deltas.view(-1).to(lengths)  # [3, U, L], [U]
    flat = (mask.cumsum(-1) - 1).clamp(min=0)  # [U, L]
    return flat[None].expand(3, -1, -1), lengths


def text_positions(next_pos: Tensor, start: int, count: int) -> Tensor:
    """Positions [3, b, count] of tokens start .. start + count - 1 after each row's prompt (`next_pos` [b])."""
    pos = next_pos[:, None] + torch.arange(start, start + count, device=next_pos.device)  # [b, count]
    return pos[None].expand(3, -1, -1)


def forward_positions(inputs: dict[str, Tensor]) -> Tensor | None:
    """None: a full forward computes its rope index itself (from `mm_token_type_ids` and `image_grid_thw`)."""
    return None


def encode_images(model: Any, prompts: Sequence[Encoded], device: torch.device) -> Any:
    """The vision output of the prompts' images, in order: `pooler_output` one tensor per image (and Qwen3-VL's
    `deepstack_features`)."""
    pix = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None]).to(device)  # [P, D]
    grid = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None]).to(device)  # [I, 3]
    return model.get_image_features(pixel_values=pix, image_grid_thw=grid, return_dict=True)


def image_units(prompt: Encoded) -> int:
    """Entries of `encode_images`' output that belong to `prompt`: its images."""
    return 0 if prompt.image_grid_thw is None else int(prompt.image_grid_thw.shape[0])


def select_images(encoded: Any, index: Sequence[int]) -> Any:
    """`encoded` with its per-image entries taken at `index` (repeats allowed), for `mm_encoder_outputs`."""
    out = copy.copy(encoded)
    out.pooler_output = [encoded.pooler_output[i] for i in index]
    deep = getattr(encoded, "deepstack_features", None)  # Qwen3-VL: one per-image list per deepstack layer
    if deep is not None:
        out.deepstack_features = [[layer[i] for i in index] for layer in deep]
    return out


def text_decoder(model: nn.Module) -> nn.Module | None:
    """The text decoder (Qwen2 / Qwen3 layers; M-RoPE, which on text positions is the 1-D rotary embedding)."""
    inner = getattr(model, "model", None)
    decoder = getattr(inner, "language_model", None)
    return decoder if isinstance(decoder, nn.Module) else None


def image_slot(processor: Any, width: int, height: int) -> ImageSlot:
    """What the processor makes of a width x height image: the min/max-pixel resize to multiples of patch x
    merge, then one `image_token` per merge x merge patches."""
    ip = processor.image_processor
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    size = ip.size
    h, w = smart_resize(height, width, patch * merge, int(size["shortest_edge"]), int(size["longest_edge"]))
    n = (h // patch) * (w // patch) // (merge * merge)
    return ImageSlot(resized=(w, h), tiles=1, image_tokens=n, text=str(processor.image_token) * n)
