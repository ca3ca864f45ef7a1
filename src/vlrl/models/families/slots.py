"""What a family's processor makes of one image, known from its size alone (no pixels processed): the record
each family's `image_slot(processor, width, height)` returns, read by the token-budget audit
(`vlrl.curate.audit`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSlot:
    """One image as the processor expands it.

    resized: (w, h) the processor resizes the image to (Qwen-VL: the min/max-pixel resize; InternVL: the tile
        canvas, thumbnail not counted); tiles: images the vision tower sees (Qwen-VL: 1; InternVL: the tiles plus
        the thumbnail when there is more than one tile); image_tokens: the processor's `image_token`s, the positions
        the model fills with vision features; text: what the processor writes in place of the image's one
        `image_token` (those tokens and, for InternVL, the `<img>` / `</img>` around them).
    """

    resized: tuple[int, int]
    tiles: int
    image_tokens: int
    text: str


__all__ = ["ImageSlot"]
