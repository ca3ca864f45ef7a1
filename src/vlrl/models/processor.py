"""Processors: Hugging Face's when it loads, else an image-only processor of the model's family that needs no
torchvision.

transformers' Qwen2-VL / Qwen3-VL and InternVL processors also build a video processor, which needs torchvision.
`ImageOnlyProcessor` (Qwen-VL) does the same text and image work with the PIL image processor (same
min/max-pixel resize, patching and `image_grid_thw`), and returns `mm_token_type_ids` like HF's;
`vlrl.models.families.internvl.InternVLImageOnlyProcessor` does InternVL's (tiles, `<img>` + context tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlrl.models.chat import ChatProcessor, expand_image_tokens, read_chat_template, token_id
from vlrl.models.families import FAMILIES, INTERNVL, QWEN_VL, Family, family_of, family_of_image_token
from vlrl.models.families.internvl import InternVLImageOnlyProcessor

log = logging.getLogger(__name__)

IMAGE_TOKEN = QWEN_VL.image_token


class ImageOnlyProcessor(ChatProcessor):
    """Tokenizer + Qwen2-VL PIL image processor; the subset of `Qwen2VLProcessor` vlrl uses."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, chat_template: str | None = None):
        super().__init__(tokenizer, image_processor, chat_template)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def _encode_images(self, images: list[Image.Image]) -> tuple[dict[str, Any], list[str]]:
        img = self.image_processor(images=images, return_tensors="pt")  # pixel_values [P, C*t*p*p], grid [I, 3]
        counts = (img["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        return dict(img), [self.image_token * c for c in counts]

    def _extra_inputs(self, enc: Any) -> dict[str, Any]:
        return {"mm_token_type_ids": (enc["input_ids"] == self.image_token_id).long()}  # 1 = image token

    def save_pretrained(self, out: str | Path) -> None:
        self._save(out, {"processor_class": "Qwen2VLProcessor"})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageOnlyProcessor:
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        cfg = json.loads((path / "preprocessor_config.json").read_text())
        keep = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        kwargs = {k: cfg[k] for k in keep if k in cfg}
        size = cfg.get("size") or {}
        if "shortest_edge" in size:
            kwargs.setdefault("min_pixels", size["shortest_edge"])
        if "longest_edge" in size:
            kwargs.setdefault("max_pixels", size["longest_edge"])
        return cls(tokenizer, Qwen2VLImageProcessorPil(**kwargs), chat_template=read_chat_template(path))


def folder_model_type(path: str | Path) -> str:
    """config.json's `model_type` of a model folder; "" when it has no config.json."""
    cfg = Path(path) / "config.json"
    return str(json.loads(cfg.read_text()).get("model_type", "")) if cfg.exists() else ""


def _fallback_processor(path: str | Path) -> Any:
    """The image-only processor of the folder's family (Qwen-VL's when the folder has no config.json)."""
    model_type = folder_model_type(path)
    if model_type and family_of(model_type) is INTERNVL:
        return InternVLImageOnlyProcessor.from_pretrained(path)
    return ImageOnlyProcessor.from_pretrained(path)


def _apply_pixel_limits(proc: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Qwen-VL: transformers 5 keeps min/max pixels as size's shortest/longest edge. InternVL (fixed-size tiles,
    size {height, width}): the limits bound the tile count, max_patches = max_pixels // tile area (at least 1),
    min_patches = ceil(min_pixels / tile area) (at most max_patches)."""
    ip = proc.image_processor
    size = dict(ip.size or {})
    if "height" in size and "width" in size:
        tile = int(size["height"]) * int(size["width"])
        if max_pixels is not None:
            ip.max_patches = max(1, max_pixels // tile)
        if min_pixels is not None:
            ip.min_patches = max(1, min(-(-min_pixels // tile), int(ip.max_patches)))
        return
    size["shortest_edge"] = min_pixels if min_pixels is not None else size.get("shortest_edge")
    size["longest_edge"] = max_pixels if max_pixels is not None else size.get("longest_edge")
    ip.size = size


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """Load the processor of a local HF VLM folder; fall back to the family's image-only processor when
    transformers' own cannot be built (no torchvision). min/max pixels override the saved ones."""
    proc: Any
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        if not hasattr(proc, "image_processor"):
            raise TypeError(f"{type(proc).__name__} has no image processor")
    except Exception as err:  # noqa: BLE001 - any failure here means: use the image-only path
        log.info("AutoProcessor failed for %s (%s); using the image-only processor", path, err)
        proc = _fallback_processor(path)
    if min_pixels is not None or max_pixels is not None:
        _apply_pixel_limits(proc, min_pixels, max_pixels)
    return proc


def image_token_id(processor: Any) -> int:
    """The id of the token the model fills with vision features: `<|image_pad|>` (Qwen-VL), `<IMG_CONTEXT>`
    (InternVL). It is the processor's `image_token`, as HF's processors and vlrl's image-only ones name it."""
    return token_id(processor.tokenizer, str(getattr(processor, "image_token", None) or IMAGE_TOKEN))


def family_of_processor(processor: Any) -> Family:
    """The family a processor serves, from its `image_token` (Qwen-VL's when it names none)."""
    return family_of_image_token(str(getattr(processor, "image_token", None) or IMAGE_TOKEN))


def vision_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The vision tokens of this tokenizer, by id: every family's vision tokens that are added tokens of it (an
    InternVL tokenizer also holds Qwen's: InternVL3 extends Qwen2.5's)."""
    added = tokenizer.get_added_vocab()
    return sorted({t for f in FAMILIES for t in f.vision_tokens if t in added}, key=added.__getitem__)


def vision_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the vision tokens a model must never sample (`vision_tokens`): image placeholders, not text, to
    which a random or weak model still gives probability."""
    added = tokenizer.get_added_vocab()
    return [added[t] for t in vision_tokens(tokenizer)]


def reserved_tokens(processor: Any) -> tuple[str, ...]:
    """Text that must not reach the processor from a user: the tokenizer's vision tokens (`vision_tokens`) and
    the strings the processor itself expands or writes around an image (its `image_token`; InternVL's
    `start_image_token` / `end_image_token`, `<img>` / `</img>`), which it would read as image slots."""
    named = (getattr(processor, name, None) for name in ("image_token", "start_image_token", "end_image_token",
                                                        "video_token"))
    return tuple(dict.fromkeys([*vision_tokens(processor.tokenizer), *(str(t) for t in named if t)]))


__all__ = [
    "ChatProcessor", "ImageOnlyProcessor", "load_processor", "image_token_id", "vision_token_ids", "vision_tokens",
    "reserved_tokens",
    "expand_image_tokens", "token_id", "read_chat_template", "folder_model_type", "family_of_processor",
]
