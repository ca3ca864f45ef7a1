"""Image loading with a decompression-bomb guard and the Qwen-VL min/max-pixel resize.

Every failure is a `DataError` naming the image file; readers re-locate it at the record's file:line/field.

The pixel guard: an image whose header declares more than `max_image_pixels` pixels is refused before any
pixel is decoded. PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting we do not touch)
also applies: its `DecompressionBombError` (above twice that limit) always becomes a `DataError`; its
`DecompressionBombWarning` becomes a `DataError` when our limit is not above PIL's (otherwise the caller
asked for bigger images explicitly and the warning is silenced).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from vlrl.data.errors import DataError
from vlrl.data.resize import DEFAULT_FACTOR, smart_resize

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def _open(path: str | Path, max_image_pixels: int) -> Image.Image:
    """Open lazily (header only) and apply the pixel guard. The caller closes the image."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, message="image file not found")
    escalate = max_image_pixels <= (Image.MAX_IMAGE_PIXELS or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(p, message=f"refused as a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(p, message=f"unreadable image: {exc}") from exc
    w, h = im.size
    if w * h > max_image_pixels:
        im.close()
        raise DataError(
            p,
            message=f"refused as a decompression bomb: header declares {w}x{h} = {w * h} pixels "
            f"> max_image_pixels={max_image_pixels}",
        )
    return im


def image_size(path: str | Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) read from the file header only (no pixel is decoded)."""
    with _open(path, max_image_pixels) as im:
        return im.size


def check_image(path: str | Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Raise `DataError` unless `path` is a readable image within the pixel guard; return (width, height).

    Cheaper than decoding: parses the header and runs PIL's `verify()` (chunk CRCs for PNG). A file whose
    compressed pixel data is corrupt in a way `verify` does not see still fails later, in `load_image`."""
    with _open(path, max_image_pixels) as im:
        size = im.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.verify()
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error ...)
            raise DataError(path, message=f"unreadable image: {exc}") from exc
    return size


def load_image(
    path: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = DEFAULT_FACTOR,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `path` as RGB. When `min_pixels` or `max_pixels` is given, resize (bicubic) to
    `smart_resize(h, w, factor, min_pixels, max_pixels)` (the missing bound takes Qwen2-VL's default).
    Raises `DataError` naming the path when the file is missing, unreadable or too large."""
    with _open(path, max_image_pixels) as im:
        try:
            rgb = im.convert("RGB")  # decodes
        except Exception as exc:  # truncated data, bad compression stream ...
            raise DataError(path, message=f"unreadable image: {exc}") from exc
    if min_pixels is None and max_pixels is None:
        return rgb
    w, h = rgb.size
    try:
        new_h, new_w = smart_resize(
            h,
            w,
            factor,
            _DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
            _DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        )
    except ValueError as exc:
        raise DataError(path, message=str(exc)) from exc
    if (new_w, new_h) == (w, h):
        return rgb
    return rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
