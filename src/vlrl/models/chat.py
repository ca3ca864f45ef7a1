"""What vlrl's image-only processors share, whatever the family: a tokenizer + image processor + chat template
base class, the chat template file, the expansion of image placeholders and single-token ids. No family
knowledge here, so that each family's module (`vlrl.models.families.*`) can build on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase


class ChatProcessor:
    """What the image-only processors share: a tokenizer, an image processor and a chat template."""

    image_token: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template

    def __call__(
        self,
        text: str | list[str],
        images: list[Image.Image] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
        **_: Any,
    ) -> BatchFeature:
        """Token ids of `text` with each image token expanded to the image's slots, plus the image inputs."""
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images:
            image_data, replacements = self._encode_images(images)
            data.update(image_data)
            texts = expand_image_tokens(texts, self.image_token, replacements)
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        data.update(enc)
        data.update(self._extra_inputs(enc))
        return BatchFeature(data=data)

    def _encode_images(self, images: list[Image.Image]) -> tuple[dict[str, Any], list[str]]:
        """The family's image inputs and, per image, the text that replaces its image token."""
        raise NotImplementedError

    def _extra_inputs(self, enc: Any) -> dict[str, Any]:
        """Inputs the family's forward takes beside token ids and image inputs (none by default)."""
        return {}

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(*args, **kwargs))

    def save_pretrained(self, out: str | Path) -> None:
        raise NotImplementedError

    def _save(self, out: str | Path, processor_config: dict[str, Any]) -> None:
        """Tokenizer, image processor, chat template and processor_config.json, whose `processor_class` lets
        transformers' AutoProcessor build the family's full processor where torchvision exists."""
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(self.chat_template or "")
        (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2))


def read_chat_template(path: str | Path) -> str | None:
    """A folder's chat_template.jinja; None when it has none (the tokenizer's own is used)."""
    template_file = Path(path) / "chat_template.jinja"
    return template_file.read_text() if template_file.exists() else None


def expand_image_tokens(texts: list[str], token: str, replacements: list[str]) -> list[str]:
    """Replace the i-th `token` across `texts` by replacements[i] (one per image, in order)."""
    out, i = [], 0
    for t in texts:
        parts = t.split(token)
        pieces = [parts[0]]
        for part in parts[1:]:
            if i >= len(replacements):
                raise ValueError(f"more {token} placeholders than images ({len(replacements)})")
            pieces.append(replacements[i] + part)
            i += 1
        out.append("".join(pieces))
    if i != len(replacements):
        raise ValueError(f"{len(replacements)} images but {i} {token} placeholders")
    return out


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (transformers types the call as returning int | list[int])."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int):
        raise ValueError(f"{token!r} is not a single token of this tokenizer")
    return tid


__all__ = ["ChatProcessor", "expand_image_tokens", "read_chat_template", "token_id"]
