"""Processors: Hugging Face's when it loads, else an image-only Qwen-VL processor that needs no torchvision.

transformers' Qwen2-VL / Qwen3-VL processors also build a video processor, which needs torchvision.
`ImageOnlyProcessor` does the same text and image work with the PIL image processor (same
min/max-pixel resize, patching and `image_grid_thw`), and returns `mm_token_type_ids` like HF's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"


class ImageOnlyProcessor:
    """Tokenizer + Qwen2-VL PIL image processor; the subset of `Qwen2VLProcessor` vlrl uses."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(
        self,
        text: str | list[str],
        images: list[Image.Image] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
        **_: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images:
            img = self.image_processor(images=images, return_tensors="pt")
            data.update(img)  # pixel_values [P, C*t*p*p], image_grid_thw [I, 3]
            merge = self.image_processor.merge_size**2
            counts = (img["image_grid_thw"].prod(-1) // merge).tolist()
            texts = _expand_image_tokens(texts, counts)
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        data.update(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()  # 1 = image token
        return BatchFeature(data=data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(*args, **kwargs))

    def save_pretrained(self, out: str | Path) -> None:
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(self.chat_template or "")
        # processor_class lets transformers' AutoProcessor build the full Qwen2VLProcessor where torchvision exists.
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))

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
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        return cls(tokenizer, Qwen2VLImageProcessorPil(**kwargs), chat_template=template)


def _expand_image_tokens(texts: list[str], counts: list[int]) -> list[str]:
    """Replace the i-th `<|image_pad|>` across `texts` by counts[i] copies of it."""
    out, i = [], 0
    for t in texts:
        parts = t.split(IMAGE_TOKEN)
        pieces = [parts[0]]
        for part in parts[1:]:
            if i >= len(counts):
                raise ValueError(f"more {IMAGE_TOKEN} placeholders than images ({len(counts)})")
            pieces.append(IMAGE_TOKEN * counts[i] + part)
            i += 1
        out.append("".join(pieces))
    if i != len(counts):
        raise ValueError(f"{len(counts)} images but {i} {IMAGE_TOKEN} placeholders")
    return out


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """Load the processor of a local HF VLM folder; fall back to `ImageOnlyProcessor` when
    transformers' own cannot be built (no torchvision). min/max pixels override the saved ones."""
    proc: Any
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        if not hasattr(proc, "image_processor"):
            raise TypeError(f"{type(proc).__name__} has no image processor")
    except Exception as err:  # noqa: BLE001 - any failure here means: use the image-only path
        log.info("AutoProcessor failed for %s (%s); using the image-only processor", path, err)
        proc = ImageOnlyProcessor.from_pretrained(path)
    if min_pixels is not None or max_pixels is not None:
        ip = proc.image_processor  # transformers 5 keeps min/max pixels as size's shortest/longest edge
        size = dict(ip.size or {})
        size["shortest_edge"] = min_pixels if min_pixels is not None else size.get("shortest_edge")
        size["longest_edge"] = max_pixels if max_pixels is not None else size.get("longest_edge")
        ip.size = size
    return proc


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (transformers types the call as returning int | list[int])."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int):
        raise ValueError(f"{token!r} is not a single token of this tokenizer")
    return tid


def image_token_id(processor: Any) -> int:
    return token_id(processor.tokenizer, IMAGE_TOKEN)


def vision_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the vision tokens a model must never sample: image placeholders, not text, to which a random or
    weak model still gives probability."""
    from vlrl.models.tokenizer import VISION_TOKENS

    unk = tokenizer.unk_token_id
    ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    return sorted(i for i in ids if isinstance(i, int) and i != unk)


__all__ = ["ImageOnlyProcessor", "load_processor", "image_token_id", "vision_token_ids"]
