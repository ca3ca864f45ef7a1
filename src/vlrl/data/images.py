"""Image loading with a decompression-bomb guard and the Qwen-VL min/max-pixel resize.

Every failure is a `DataError` naming the image file; readers re-locate it at the record's file:line/field.
An image embedded in a data file is named by a reference string (`vlrl.data.embedded`): the same functions take
it, read its bytes only then, apply the same limits, and name `file:row: field` in their errors.

The pixel guard: an image whose header declares more than `max_image_pixels` pixels is refused before any
pixel is decoded. PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting we do not touch)
also applies: its `DecompressionBombError` (above twice that limit) always becomes a `DataError`; its
`DecompressionBombWarning` becomes a `DataError` when our limit is not above PIL's (otherwise the caller
asked for bigger images explicitly and the warning is silenced).
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlrl.data.embedded import parse_ref, read_ref
from vlrl.data.errors import DataError
from vlrl.data.resize import DEFAULT_FACTOR, smart_resize

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def missing_image(path: str | Path) -> str:
    """Why `path` (not a regular file) is no image, in words: a directory, a symlink loop, a broken symlink, or
    simply not there."""
    p = Path(path)
    if p.is_dir():
        return f"image path is a directory, not a file: {p}"
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:  # Python 3.11 raises RuntimeError on a loop, later ones OSError (ELOOP)
            return f"image path is a symlink loop: {p}"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"image path is a symlink loop: {p}"
            return f"image path is a broken symlink (to {os.readlink(p)}): {p}"
    if p.exists():
        return f"image path is not a regular file: {p}"
    return f"image file not found: {p}"


def _source(path: str | Path) -> tuple[Any, Callable[[str], DataError]]:
    """(what PIL opens: a file path or the embedded bytes, a builder of errors located at the image)."""
    ref = parse_ref(path) if isinstance(path, str) else None
    if ref is not None:
        data, _ = read_ref(ref)
        return io.BytesIO(data), ref.error
    p = Path(path)
    if not p.is_file():
        raise DataError(p, message=missing_image(p).rsplit(": ", 1)[0])
    return p, lambda message: DataError(p, message=message)


def open_checked(source: Any, error: Callable[[str], DataError], max_image_pixels: int) -> Image.Image:
    """Open `source` (a path or a binary stream) lazily, header only, and apply the pixel guard; errors come from
    `error(message)`. The caller closes the image."""
    escalate = max_image_pixels <= (Image.MAX_IMAGE_PIXELS or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise error(f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:  # its text names a BytesIO object for embedded bytes: say what it means
        raise error("unreadable image: not in any image format PIL reads") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise error(f"unreadable image: {exc}") from exc
    w, h = im.size
    if w * h > max_image_pixels:
        im.close()
        raise error(
            f"refused as a decompression bomb: header declares {w}x{h} = {w * h} pixels "
            f"> max_image_pixels={max_image_pixels}"
        )
    return im


def verify_open(im: Image.Image, error: Callable[[str], DataError]) -> None:
    """PIL's `verify()` (chunk CRCs for PNG) on an image opened by `open_checked`; unusable afterwards."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error ...)
        raise error(f"unreadable image: {exc}") from exc


def _open(path: str | Path, max_image_pixels: int) -> tuple[Image.Image, Callable[[str], DataError]]:
    source, error = _source(path)
    return open_checked(source, error, max_image_pixels), error


def image_size(path: str | Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) read from the file header only (no pixel is decoded)."""
    im, _ = _open(path, max_image_pixels)
    with im:
        return im.size


def check_image(path: str | Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Raise `DataError` unless `path` is a readable image within the pixel guard; return (width, height).

    Cheaper than decoding: parses the header and runs PIL's `verify()` (chunk CRCs for PNG). A file whose
    compressed pixel data is corrupt in a way `verify` does not see still fails later, in `load_image`."""
    im, error = _open(path, max_image_pixels)
    with im:
        size = im.size
        verify_open(im, error)
    return size


def check_image_bytes(data: bytes, error: Callable[[str], DataError], *,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """`check_image` of bytes already in memory (an embedded image as a reader meets it)."""
    with open_checked(io.BytesIO(data), error, max_image_pixels) as im:
        size = im.size
        verify_open(im, error)
    return size


def load_image(
    path: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = DEFAULT_FACTOR,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `path` (a file, or an embedded-image reference) as RGB. When `min_pixels` or `max_pixels` is
    given, resize (bicubic) to `smart_resize(h, w, factor, min_pixels, max_pixels)` (the missing bound takes
    Qwen2-VL's default). Raises `DataError` naming the path (or file:row: field) when the image is missing,
    unreadable or too large."""
    im, error = _open(path, max_image_pixels)
    with im:
        try:
            rgb = im.convert("RGB")  # decodes
        except Exception as exc:  # truncated data, bad compression stream ...
            raise error(f"unreadable image: {exc}") from exc
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
        raise error(str(exc)) from exc
    if (new_w, new_h) == (w, h):
        return rgb
    return rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
