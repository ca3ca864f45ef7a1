"""Build the built-in models: a local tokenizer, a chat template, an image processor and a randomly initialised
Qwen2-VL / Qwen2.5-VL / Qwen3-VL or InternVL (transformers' `InternVLForConditionalGeneration`, Qwen2 text),
saved in Hugging Face format.

`transformers.AutoModelForImageTextToText.from_pretrained(DIR)` loads the result, and so does
`vlrl.models.load_model_and_processor(DIR)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    InternVLForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlrl.models.families.internvl import internvl_config, internvl_processor, internvl_tokenizer, tile_size
from vlrl.models.processor import ChatProcessor, ImageOnlyProcessor, token_id
from vlrl.models.sizes import SIZE_TABLE, Size, text_dims
from vlrl.models.tokenizer import TAG_TOKENS, train_tokenizer

ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl")
def _mrope_section(head_dim: int) -> list[int]:
    """Qwen's [16, 24, 24] for head_dim 128, scaled: (t, h, w) sections summing to head_dim / 2."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_config(s: Size, qwen3: bool = False) -> dict[str, Any]:
    head_dim = s.hidden // s.heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    if qwen3:
        rope["mrope_interleaved"] = True
    cfg = text_dims(s, rope)
    if qwen3:
        cfg["head_dim"] = head_dim
    return cfg


def _vision_config(arch: str, s: Size) -> dict[str, Any]:
    if arch == "qwen2-vl":
        return dict(depth=s.vision_depth, embed_dim=s.vision_width, hidden_size=s.hidden, num_heads=s.vision_heads,
                    mlp_ratio=2, patch_size=14, spatial_merge_size=2)
    if arch == "qwen2.5-vl":
        full = [i for i in range(s.vision_depth) if i % 2 == 1]  # window attention elsewhere, as Qwen2.5-VL
        return dict(depth=s.vision_depth, hidden_size=s.vision_width, intermediate_size=2 * s.vision_width,
                    num_heads=s.vision_heads, out_hidden_size=s.hidden, patch_size=14, spatial_merge_size=2,
                    window_size=112, fullatt_block_indexes=full)
    return dict(depth=s.vision_depth, hidden_size=s.vision_width, intermediate_size=2 * s.vision_width,
                num_heads=s.vision_heads, out_hidden_size=s.hidden, patch_size=16, spatial_merge_size=2,
                num_position_embeddings=256, deepstack_visual_indexes=[1, 2])


def model_config(arch: str, size: str, token_ids: dict[str, int], image_pixels: int | None = None) -> PretrainedConfig:
    """The HF config of a built-in model; `token_ids` maps image/video/vision_start/vision_end/eos/pad (InternVL:
    image = `<IMG_CONTEXT>`, eos, pad). `image_pixels` sets InternVL's tile size (default 112 x 112)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if size not in SIZE_TABLE:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZE_TABLE)}")
    s = SIZE_TABLE[size]
    if arch == "internvl":
        return internvl_config(s, token_ids, tile=tile_size(image_pixels))
    text = _text_config(s, qwen3=arch == "qwen3-vl")
    text.update(bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    common: dict[str, Any] = dict(
        text_config=text,
        vision_config=_vision_config(arch, s),
        image_token_id=token_ids["image"],
        video_token_id=token_ids["video"],
        vision_start_token_id=token_ids["vision_start"],
        vision_end_token_id=token_ids["vision_end"],
        tie_word_embeddings=True,
    )
    cls = {"qwen2-vl": Qwen2VLConfig, "qwen2.5-vl": Qwen2_5_VLConfig, "qwen3-vl": Qwen3VLConfig}[arch]
    return cls(**common)


def _model_class(arch: str) -> type[PreTrainedModel]:
    return {
        "qwen2-vl": Qwen2VLForConditionalGeneration,
        "qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3-vl": Qwen3VLForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
    }[arch]


def default_corpus(n_per_task: int = 400, seed: int = 0) -> list[str]:
    """Questions and answers of the synthetic tasks, plus chat and reasoning tags: the tokenizer's corpus."""
    from vlrl.data.synth import TASKS

    rng = random.Random(seed)
    texts = []
    for task in TASKS.values():
        for i in range(n_per_task):
            _, question, answer, _ = task.generate(rng, i)
            texts.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<answer>{answer}</answer>")
    texts += [f"{t} " for t in TAG_TOKENS] + ["You are a helpful assistant.", "yes no true false"]
    texts += [" ".join(str(i) for i in range(0, 1001)), "0123456789 .,;:!?()[]{}+-*/=%$"]
    return texts


def _tokenizer(arch: str, corpus: Iterable[str], vocab: int) -> PreTrainedTokenizerFast:
    if arch == "internvl":
        return internvl_tokenizer(corpus, vocab_size=vocab)
    return train_tokenizer(corpus, vocab_size=vocab)


def _token_ids(arch: str, tok: PreTrainedTokenizerBase) -> dict[str, int]:
    names = [("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
             ("vision_end", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>")]
    if arch == "internvl":
        names = [("image", "<IMG_CONTEXT>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>")]
    return {k: token_id(tok, t) for k, t in names}


def _processor(arch: str, tok: PreTrainedTokenizerBase, image_pixels: int | None) -> ChatProcessor:
    """The saved processor. Qwen-VL: `image_pixels` is max_pixels (default: a 4x4 grid of merged patches, 16 vision
    tokens). InternVL: one square tile of about `image_pixels` (default 112 x 112, 16 vision tokens)."""
    if arch == "internvl":
        return internvl_processor(tok, tile_size(image_pixels))
    patch = 16 if arch == "qwen3-vl" else 14
    image_pixels = image_pixels or (patch * 2 * 4) ** 2
    image_proc = Qwen2VLImageProcessorPil(min_pixels=(patch * 2) ** 2, max_pixels=image_pixels, patch_size=patch)
    return ImageOnlyProcessor(tok, image_proc)


def init_model(arch: str, size: str, out: str | Path, seed: int = 0, corpus: Iterable[str] | None = None,
               image_pixels: int | None = None) -> Path:
    """Write a tokenizer, chat template, image processor and random model to `out` (HF format).
    `image_pixels`: Qwen-VL's max_pixels, InternVL's tile area (default: 16 vision tokens per image)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = SIZE_TABLE[size].vocab if size in SIZE_TABLE else 0
    tok = _tokenizer(arch, corpus if corpus is not None else default_corpus(seed=seed), vocab - 8)
    ids = _token_ids(arch, tok)
    cfg = model_config(arch, size, ids, image_pixels=image_pixels)
    if len(tok) > cfg.get_text_config().vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary")
    torch.manual_seed(seed)
    model = _model_class(arch)(cfg)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    _processor(arch, tok, image_pixels).save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
