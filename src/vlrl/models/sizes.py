"""The built-in model sizes, shared by every family's builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Size:
    """Widths of one built-in size (every family's). Text head_dim = hidden / heads; mrope_section sums to
    head_dim / 2."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vocab: int


# tiny: 3.85 M parameters (text 256 x 4 layers, vision 128 x 4), small enough for the CPU demo to train end to end.
# small: ~31 M (text 512 x 8 layers, vision 256 x 6), the second size of the side-by-side RL benchmark.
SIZE_TABLE = {
    "tiny": Size(256, 4, 4, 2, 512, 128, 4, 4, 1536),
    "small": Size(512, 8, 8, 4, 1536, 256, 6, 4, 4096),
}


def text_dims(s: Size, rope: dict[str, Any]) -> dict[str, Any]:
    """The text model's config keys of size `s` with rotary settings `rope` (tied embeddings, 4,096 positions)."""
    return dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=4096,
        rope_parameters=rope,
        tie_word_embeddings=True,
    )
