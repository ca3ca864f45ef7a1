"""Qwen-VL image sizing: the size an image has after the processor's min/max-pixel resize."""

from __future__ import annotations

import math

DEFAULT_FACTOR = 28  # patch 14 x spatial merge 2 (Qwen2-VL / Qwen2.5-VL); Qwen3-VL uses 32


def smart_resize(
    height: int, width: int, factor: int = DEFAULT_FACTOR, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Return (new_height, new_width): both multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible. Same rule as transformers' Qwen2-VL `smart_resize`."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
