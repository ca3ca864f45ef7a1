"""Rollout images as inline data URLs, so the report opens with no file beside it and no network.

Images are shrunk to thumbnails (the report shows what the model saw, not a full-resolution copy: a step of a
real dataset holds several photos) and encoded once per path however many rows show them.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from vlrl.data.images import load_image

MAX_SIDE = 320  # pixels: a thumbnail a reader can still read a chart from
PNG_LIMIT = 48_000  # bytes: a thumbnail whose PNG is larger (a photo) is sent as JPEG instead


class ImageInliner:
    """`url(path)`: the image at `path` as a `data:` URL, None when it cannot be read (missing file, not an
    image, corrupt); relative paths are tried as given, then from `base`."""

    def __init__(self, base: Path | None = None, max_side: int = MAX_SIDE):
        self.base = base
        self.max_side = max_side
        self._cache: dict[str, str | None] = {}

    def url(self, path: str) -> str | None:
        if path not in self._cache:
            self._cache[path] = self._encode(path)
        return self._cache[path]

    def _encode(self, path: str) -> str | None:
        candidates = [path]
        if self.base is not None and not Path(path).is_absolute():
            candidates.append(str(self.base / path))
        for candidate in candidates:
            try:
                im = load_image(candidate)  # embedded (parquet:/arrow:) references resolve too
            except Exception:  # any unreadable image becomes a placeholder: a report never fails on one
                continue
            return _data_url(im, self.max_side)
        return None


def _data_url(im: Image.Image, max_side: int) -> str:
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    mime = "image/png"
    if buf.tell() > PNG_LIMIT:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
