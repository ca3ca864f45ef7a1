"""Decode the images of a chat request: inline `data:` URLs only, with a decompression-bomb guard.

Remote URLs are never fetched (the server makes no outbound connections by design). The pixel guard reads
the image header first and refuses an image whose declared width x height exceeds `max_pixels` before any
pixel is decoded; only a few well-known raster formats are accepted (no EPS/PDF/... plugins that shell out).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+(?:=[\w.+-]+)?)*),", re.ASCII | re.IGNORECASE)


class ImageInputError(ValueError):
    """An image the request cannot use; the message is safe to return to the client."""


def check_image_url(url: str) -> None:
    """Raise `ImageInputError` unless `url` is an inline `data:image/...;base64,` URL."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise ImageInputError(
            "remote image URLs are not fetched: this server makes no outbound network requests; "
            "send the image inline as a data URL (data:image/png;base64,...)"
        )
    if scheme != "data":
        raise ImageInputError("unsupported image URL: only inline data URLs (data:image/png;base64,...) are accepted")


def data_url_bytes(url: str, *, max_bytes: int) -> bytes:
    """The decoded payload of a `data:image/...;base64,...` URL (at most `max_bytes`), else `ImageInputError`."""
    check_image_url(url)
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageInputError("malformed data URL: expected data:image/<type>;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise ImageInputError(f"data URL media type must be image/*, got {mime[:50] or 'none'!r}")
    if ";base64" not in m.group("params").lower():
        raise ImageInputError("data URL must be base64-encoded (data:image/png;base64,...)")
    payload = url[m.end():]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ImageInputError(f"image larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"invalid base64 in data URL: {exc}") from None


def _open_checked(raw: bytes, max_pixels: int) -> Image.Image:
    """Open `raw` lazily (header only) and refuse it when the header declares more than `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            im = Image.open(io.BytesIO(raw), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, SyntaxError ...)
        raise ImageInputError(f"unreadable image ({type(exc).__name__}); accepted formats: "
                              f"{', '.join(ALLOWED_FORMATS)}") from None
    w, h = im.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        im.close()
        if w <= 0 or h <= 0:
            raise ImageInputError(f"image has an empty size {w}x{h}")
        raise ImageInputError(
            f"image refused as a possible decompression bomb: header declares {w}x{h} = {w * h} pixels "
            f"> limit {max_pixels}"
        )
    return im


def check_image_bytes(raw: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header of `raw`, after the format and pixel checks; no pixel is decoded."""
    with _open_checked(raw, max_pixels) as im:
        return im.size


def decode_image_bytes(raw: bytes, *, max_pixels: int) -> Image.Image:
    """`raw` decoded to RGB, after the header checks of `check_image_bytes`."""
    with _open_checked(raw, max_pixels) as im:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return im.convert("RGB")  # decodes
        except Exception as exc:  # noqa: BLE001 - truncated data, bad compression stream ...
            raise ImageInputError(f"image could not be decoded ({type(exc).__name__})") from None


def decode_data_url(url: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """The RGB image of a `data:image/...;base64,...` URL; `ImageInputError` when it is not such a URL, the
    payload exceeds `max_bytes`, the format is not one of ALLOWED_FORMATS, the header declares more than
    `max_pixels` pixels, or decoding fails."""
    return decode_image_bytes(data_url_bytes(url, max_bytes=max_bytes), max_pixels=max_pixels)
