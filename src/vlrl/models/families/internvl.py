"""InternVL through transformers' own `InternVLForConditionalGeneration` (the HF-format InternVL3 / InternVL3.5
checkpoints): the built-in model's config, tokenizer and chat template, and an image-only processor that needs no
torchvision.

How InternVL sees an image (transformers 5.24): the GotOcr2 image processor resizes it to fixed square tiles
(`size` {height, width}; with `crop_to_patches`, up to `max_patches` tiles on the grid closest to its aspect
ratio, plus a thumbnail when there is more than one); pixel_values [N tiles, 3, H, W]. The ViT (with a CLS
token, dropped) gives (H / patch)^2 features per tile; a pixel shuffle with `downsample_ratio` 0.5 folds 2 x 2
neighbours into one, so a tile is `image_seq_length` = (H / patch)^2 / 4 tokens, projected by
`multi_modal_projector` (LayerNorm, Linear, GELU, Linear). The processor writes each image as
`<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`; the model fills the `<IMG_CONTEXT>` positions
(`config.image_token_id`).

What the rollout engine and the training forwards ask of this family (the functions after the processor):
positions are plain 1-D, counted over each row's real tokens as `generate` counts them (no M-RoPE, no
`image_grid_thw`, no `mm_token_type_ids`: the forward takes neither); `get_image_features(pixel_values)` returns
one [image_seq_length, hidden] block per tile, [N tiles, image_seq_length, hidden], and a prompt owns as many
blocks as its pixel_values has tiles; the text decoder is `model.model.language_model`, which
`vlrl.rollout.lean_step.LeanStep` re-lays when it is a Qwen2 / Qwen3 model (InternVL3 / InternVL3.5).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from vlrl.models.chat import ChatProcessor, read_chat_template, token_id
from vlrl.models.families.slots import ImageSlot
from vlrl.models.sizes import Size, text_dims
from vlrl.models.tokenizer import train_tokenizer

if TYPE_CHECKING:
    from vlrl.models.inputs import Encoded

# InternVL's tokens (transformers' InternVLProcessor reads them from these tokenizer attributes).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Every special token InternVL adds to its Qwen2.5 tokenizer, in the checkpoints' order, then the video token.
INTERNVL_SPECIAL_TOKENS = [
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
]  # fmt: skip
INTERNVL_VISION_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values")

TEXT_MODEL_TYPES = ("qwen2", "qwen3")  # InternVL3 (Qwen2.5 text), InternVL3.5 (Qwen3 text)
PATCH = 14
DEFAULT_TILE = 112  # 8 x 8 patches -> 4 x 4 after the pixel shuffle: 16 tokens per tile, as the Qwen tiny models
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# InternVL's HF chat template as transformers' conversion script writes it (ChatML, no default system message),
# with the placeholders transformers 5's InternVLProcessor expands: an image is `<IMG_CONTEXT>` and a newline, a
# video `<video>` and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tile_size(image_pixels: int | None) -> int:
    """The tile side for a pixel budget: a multiple of 2 x patch (the pixel shuffle halves the patch grid)."""
    if image_pixels is None:
        return DEFAULT_TILE
    return max(2 * PATCH, int(image_pixels**0.5) // (2 * PATCH) * 2 * PATCH)


def internvl_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """vlrl's local BPE with Qwen's special tokens, InternVL's (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>`,
    `<ref>`, `<box>`, ..., `<video>`) and the attributes that name them; InternVL's chat template."""
    return train_tokenizer(corpus, vocab_size=vocab_size, extra_special=INTERNVL_SPECIAL_TOKENS,
                           named_tokens=INTERNVL_NAMED_TOKENS, chat_template=CHAT_TEMPLATE)


def _text_config(s: Size, text_model_type: str) -> dict[str, Any]:
    if text_model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"unknown InternVL text model {text_model_type!r}; valid: {', '.join(TEXT_MODEL_TYPES)}")
    cfg = {"model_type": text_model_type, **text_dims(s, {"rope_type": "default", "rope_theta": 10000.0})}
    if text_model_type == "qwen3":
        cfg["head_dim"] = s.hidden // s.heads
    return cfg


def internvl_config(s: Size, token_ids: dict[str, int], tile: int = DEFAULT_TILE,
                    text_model_type: str = "qwen2") -> InternVLConfig:
    """The HF config of a built-in InternVL: InternViT-style encoder (LayerNorm, no qk-norm, as InternVL3's 300M
    ViT) of `s.vision_*` widths on `tile`-pixel tiles, pixel shuffle 0.5, a Qwen2 / Qwen3 text model.
    `token_ids` maps image (the `<IMG_CONTEXT>` id), eos and pad."""
    if tile % (2 * PATCH):
        raise ValueError(f"tile size {tile} is not a multiple of {2 * PATCH}")
    text = _text_config(s, text_model_type)
    text.update(bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    vision = dict(
        hidden_size=s.vision_width,
        num_hidden_layers=s.vision_depth,
        num_attention_heads=s.vision_heads,
        intermediate_size=2 * s.vision_width,
        image_size=tile,
        patch_size=PATCH,
        norm_type="layer_norm",
        use_qk_norm=False,
    )
    return InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["image"],
        image_seq_length=tokens_per_tile(tile, PATCH, 0.5),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def tokens_per_tile(tile: int, patch: int, downsample_ratio: float) -> int:
    """Tokens per tile: the (tile / patch)^2 ViT features after the pixel shuffle."""
    return int((tile // patch) ** 2 * downsample_ratio**2)


class InternVLImageOnlyProcessor(ChatProcessor):
    """Tokenizer + GotOcr2 PIL image processor; the image part of transformers' `InternVLProcessor` (same tiling,
    crop_to_patches on as its default, same `<img>` + `<IMG_CONTEXT>` x n + `</img>` expansion)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, image_seq_length: int,
                 chat_template: str | None = None):
        super().__init__(tokenizer, image_processor, chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = _named(tokenizer, "start_image_token")
        self.end_image_token = _named(tokenizer, "end_image_token")
        self.image_token = _named(tokenizer, "context_image_token")
        self.image_token_id = token_id(tokenizer, self.image_token)

    def _encode_images(self, images: list[Image.Image]) -> tuple[dict[str, Any], list[str]]:
        img = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        tiles = torch.as_tensor(img["num_patches"]).tolist()
        return {"pixel_values": img["pixel_values"]}, [slot_text(self, n) for n in tiles]  # pixel_values [N, 3, H, W]

    def save_pretrained(self, out: str | Path) -> None:
        self._save(out, {"processor_class": "InternVLProcessor", "image_seq_length": self.image_seq_length})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternVLImageOnlyProcessor:
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(path)
        return cls(tokenizer, image_processor, _saved_seq_length(path), chat_template=read_chat_template(path))


def _named(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """A tokenizer's named InternVL token (`start_image_token`, ...), InternVL's default when it names none."""
    try:
        value = getattr(tokenizer, name)
    except AttributeError:
        value = None
    return str(value) if value else INTERNVL_NAMED_TOKENS[name]


def _saved_seq_length(path: Path) -> int:
    """processor_config.json's image_seq_length, else the one config.json's vision settings give."""
    proc_cfg = path / "processor_config.json"
    if proc_cfg.exists() and "image_seq_length" in (saved := json.loads(proc_cfg.read_text())):
        return int(saved["image_seq_length"])
    cfg = InternVLConfig.from_pretrained(path)
    vision: Any = cfg.vision_config
    return tokens_per_tile(int(vision.image_size[0]), int(vision.patch_size[0]), float(cfg.downsample_ratio))


def internvl_processor(tokenizer: PreTrainedTokenizerBase, tile: int, max_patches: int = 1) -> InternVLImageOnlyProcessor:
    """The built-in processor: ImageNet normalisation (InternVL's), `tile`-pixel tiles, at most `max_patches`
    of them (the built-ins: 1, one tile per image)."""
    image_proc = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, image_mean=IMAGENET_MEAN,
                                          image_std=IMAGENET_STD, min_patches=1, max_patches=max_patches)
    return InternVLImageOnlyProcessor(tokenizer, image_proc, tokens_per_tile(tile, PATCH, 0.5))


def slot_text(processor: Any, tiles: int) -> str:
    """What InternVL's processor writes for an image of `tiles` tiles: `<img>`, image_seq_length context tokens
    per tile, `</img>` (the attribute names of transformers' InternVLProcessor, which ours shares)."""
    context = str(processor.image_token) * (int(processor.image_seq_length) * tiles)
    return f"{processor.start_image_token}{context}{processor.end_image_token}"


def image_slot(processor: Any, width: int, height: int) -> ImageSlot:
    """What the processor makes of a width x height image, from its image processor's tiling: crop_to_patches on
    (InternVLProcessor's default, and ours), the grid of at most max_patches tiles closest to the image's aspect
    ratio, plus a thumbnail tile when the grid has more than one; image_seq_length context tokens per tile."""
    ip = processor.image_processor
    size = ip.size
    tile_h, tile_w = int(size["height"]), int(size["width"])
    cols, rows = 1, 1
    if int(ip.max_patches) > 1:
        cols, rows = get_optimal_tiled_canvas((height, width), (tile_h, tile_w), int(ip.min_patches),
                                              int(ip.max_patches))
    tiles = int(ip.get_number_of_image_patches(height, width, {"crop_to_patches": True}))
    n = tiles * int(processor.image_seq_length)
    return ImageSlot(resized=(cols * tile_w, rows * tile_h), tiles=tiles, image_tokens=n,
                     text=slot_text(processor, tiles))


def vision(model: nn.Module) -> nn.Module:
    """The vision tower and the projector, in one ModuleList that holds the model's own modules."""
    return nn.ModuleList([model.get_submodule(f"model.{name}") for name in ("vision_tower", "multi_modal_projector")])


def merger(model: nn.Module) -> nn.Module:
    return model.get_submodule("model.multi_modal_projector")


def forward_positions(inputs: dict[str, Tensor]) -> Tensor:
    """position_ids [b, S] of a forward over `inputs`: each row's real tokens counted from 0 (left padding
    skipped, as `generate` counts them; padding positions are never attended)."""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [b, S]


def prompt_positions(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(position_ids [U, L] of the left-padded prompts, next_pos [U]: each prompt's real length)."""
    return forward_positions(inputs), inputs["attention_mask"].sum(-1)  # [U, L], [U]


def text_positions(next_pos: Tensor, start: int, count: int) -> Tensor:
    """Positions [b, count] of tokens start .. start + count - 1 after each row's prompt (`next_pos` [b])."""
    return next_pos[:, None] + torch.arange(start, start + count, device=next_pos.device)  # [b, count]


def encode_images(model: Any, prompts: Sequence[Encoded], device: torch.device) -> Any:
    """The vision output of the prompts' tiles, in order: `pooler_output` [N tiles, image_seq_length, hidden]."""
    pix = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None]).to(device)  # [N, 3, H, W]
    return model.get_image_features(pixel_values=pix, return_dict=True)


def image_units(prompt: Encoded) -> int:
    """Entries of `encode_images`' output that belong to `prompt`: its tiles."""
    return 0 if prompt.pixel_values is None else int(prompt.pixel_values.shape[0])


def select_images(encoded: Any, index: Sequence[int]) -> Any:
    """`encoded` with its tiles taken at `index` (repeats allowed; `index_select`, differentiable)."""
    out = copy.copy(encoded)
    feats = encoded.pooler_output  # [N, image_seq_length, hidden]
    out.pooler_output = feats.index_select(0, torch.tensor(list(index), dtype=torch.long, device=feats.device))
    return out


def text_decoder(model: nn.Module) -> nn.Module | None:
    """The text decoder when it is a Qwen2 / Qwen3 model (InternVL3, InternVL3.5), else None."""
    decoder = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(decoder, nn.Module) or getattr(decoder.config, "model_type", None) not in TEXT_MODEL_TYPES:
        return None
    return decoder


__all__ = [
    "CHAT_TEMPLATE", "FORWARD_KEYS", "INTERNVL_NAMED_TOKENS", "INTERNVL_SPECIAL_TOKENS", "INTERNVL_VISION_TOKENS",
    "TEXT_MODEL_TYPES", "InternVLImageOnlyProcessor", "internvl_config", "internvl_processor", "internvl_tokenizer",
    "tile_size", "tokens_per_tile", "slot_text", "image_slot",
    "vision", "merger", "forward_positions", "prompt_positions", "text_positions", "encode_images", "image_units",
    "select_images", "text_decoder",
]  # fmt: skip
