"""Reading bounding boxes from model output and mapping them to original-image pixels.

`parse_boxes(text)` tries these forms in order and returns the boxes of the first form found, as written
(no coordinate change), at most `MAX_BOXES`:

1. fenced code blocks (```` ```json ... ``` ````): the LAST block that holds at least one box;
2. the whole text as JSON (when it starts with ``[`` or ``{``);
3. flat JSON objects ``{...}`` inside the text that hold a box key;
   JSON boxes: a dict with ``bbox_2d`` (or ``bbox``, ``box``, ``box_2d``) = [x1, y1, x2, y2] and optional
   ``label`` and ``score``/``confidence``; a list of such dicts; a bare list of 4 numbers; a list of those;
4. ``<box>[x1, y1, x2, y2]</box>`` or ``<box>(x1,y1),(x2,y2)</box>`` with an optional ``<ref>label</ref>``
   just before (Qwen-VL style);
5. point pairs ``(x1, y1), (x2, y2)``;
6. bare lists ``[x1, y1, x2, y2]``.

Bounds: JSON text longer than `MAX_JSON_CHARS` is not parsed, numbers beyond +-`MAX_COORD` or not finite
are refused, regex numbers have at most 9+9 digits; every pattern is linear in the text length. Metadata is data
too: an ``image_size`` side that is not a positive integer up to `MAX_COORD`, or a ``factor`` / ``min_pixels`` /
``max_pixels`` that is not a positive integer, gives no scale factors (the item is unscorable), never an exception.

Coordinate spaces (`to_pixel_box`), for a box predicted in space S of an image of original size (w, h):

- ``pixel``: original-image pixels (identity);
- ``resized``: pixels of the image the Qwen2.5-VL processor saw: (h', w') = smart_resize(h, w, factor,
  min_pixels, max_pixels) with ``factor`` (default 28), ``min_pixels``, ``max_pixels`` from metadata
  (defaults those of `vlrl.data.resize.smart_resize`); x *= w / w', y *= h / h';
- ``norm1000``: 0..1000 (Qwen2-VL, InternVL): x *= w / 1000, y *= h / 1000;
- ``norm1``: 0..1: x *= w, y *= h.

Degenerate boxes (x2 < x1 or y2 < y1): with ``fix_degenerate=True`` (default) the coordinates are
swapped, so the box spans the same two corners; with False the box is rejected (treated as absent).
A zero-area box is kept and has IoU 0 with everything. Boxes are not clipped to the image.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from vlrl.data.resize import smart_resize

COORD_SPACES = ("pixel", "resized", "norm1000", "norm1")
MAX_BOXES = 100
MAX_JSON_CHARS = 200_000
MAX_COORD = 1e7
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")

_N = r"[-+]?\d{1,9}(?:\.\d{1,9})?"
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_FLAT_OBJECT = re.compile(r"\{[^{}]{0,2000}\}")
_BOX_TAG = re.compile(r"(?:<ref>([^<]{0,200})</ref>\s*)?<box>([^<]{0,300})</box>")
_NUMBER = re.compile(_N)
_POINT_PAIR = re.compile(
    rf"\(\s*({_N})\s*,\s*({_N})\s*\)\s*(?:,\s*)?(?:(?:to|-)\s*)?\(\s*({_N})\s*,\s*({_N})\s*\)"
)
_BARE_LIST = re.compile(rf"\[\s*({_N})\s*,\s*({_N})\s*,\s*({_N})\s*,\s*({_N})\s*\]")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x1, y1) top-left, (x2, y2) bottom-right, with optional label and confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def _coord(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int) and abs(v) > MAX_COORD:
        return None
    f = float(v)
    return f if math.isfinite(f) and abs(f) <= MAX_COORD else None


def _four(v: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    coords = [_coord(c) for c in v]
    if any(c is None for c in coords):
        return None
    x1, y1, x2, y2 = (float(c) for c in coords if c is not None)
    return x1, y1, x2, y2


def _from_dict(obj: dict[str, Any]) -> Box | None:
    for key in _BOX_KEYS:
        if key in obj:
            coords = _four(obj[key])
            if coords is None:
                return None
            label = obj.get("label")
            score = _coord(obj.get("score", obj.get("confidence")))
            return Box(*coords, label=str(label) if isinstance(label, (str, int)) else None, score=score)
    return None


def boxes_from_json(obj: Any, depth: int = 0) -> list[Box]:
    """Boxes in a decoded JSON value (see module doc), at most `MAX_BOXES`, nesting depth at most 4."""
    if depth > 4:
        return []
    if isinstance(obj, dict):
        box = _from_dict(obj)
        return [box] if box is not None else []
    if isinstance(obj, list):
        coords = _four(obj)
        if coords is not None:
            return [Box(*coords)]
        out: list[Box] = []
        for item in obj[: MAX_BOXES * 4]:
            out.extend(boxes_from_json(item, depth + 1))
            if len(out) >= MAX_BOXES:
                break
        return out[:MAX_BOXES]
    return []


def _loads(text: str) -> Any:
    if len(text) > MAX_JSON_CHARS:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_boxes(text: str) -> list[Box]:
    for block in reversed(_FENCE.findall(text)):
        boxes = boxes_from_json(_loads(block.strip()))
        if boxes:
            return boxes
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        boxes = boxes_from_json(_loads(stripped))
        if boxes:
            return boxes
    out: list[Box] = []
    for m in _FLAT_OBJECT.finditer(text):
        if any(key in m.group(0) for key in _BOX_KEYS):
            out.extend(boxes_from_json(_loads(m.group(0))))
            if len(out) >= MAX_BOXES:
                break
    return out[:MAX_BOXES]


def _tag_boxes(text: str) -> list[Box]:
    out: list[Box] = []
    for m in _BOX_TAG.finditer(text):
        coords = _four([float(n) for n in _NUMBER.findall(m.group(2))])
        if coords is not None:
            out.append(Box(*coords, label=m.group(1).strip() if m.group(1) else None))
            if len(out) >= MAX_BOXES:
                break
    return out


def _regex_boxes(pattern: re.Pattern[str], text: str) -> list[Box]:
    out: list[Box] = []
    for m in pattern.finditer(text):
        coords = _four([float(g) for g in m.groups()])
        if coords is None:  # a coordinate beyond MAX_COORD: not a box
            continue
        out.append(Box(*coords))
        if len(out) >= MAX_BOXES:
            break
    return out


def parse_boxes(text: str) -> list[Box]:
    """Boxes in `text` by the first form (module doc order) that yields any; coordinates as written."""
    if not isinstance(text, str):
        return []
    for finder in (_json_boxes, _tag_boxes):
        boxes = finder(text)
        if boxes:
            return boxes
    for pattern in (_POINT_PAIR, _BARE_LIST):
        boxes = _regex_boxes(pattern, text)
        if boxes:
            return boxes
    return []


def _positive_int(value: Any, bound: float = MAX_COORD) -> int | None:
    """`value` as a positive int no larger than `bound`, else None (a bool, NaN, inf, 10**400, "x", a list):
    metadata comes from data files, and an absurd size must make an item unscorable, not raise in the reward."""
    if isinstance(value, bool):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return n if 0 < n <= bound else None


def image_size(metadata: dict[str, Any]) -> tuple[int, int] | None:
    """(w, h) from ``metadata["image_size"]`` = [w, h] with positive integers (at most `MAX_COORD`), else None."""
    size = metadata.get("image_size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        return None
    w, h = _positive_int(size[0]), _positive_int(size[1])
    return (w, h) if w is not None and h is not None else None


def _resize_options(metadata: dict[str, Any]) -> dict[str, int] | None:
    """``factor``, ``min_pixels``, ``max_pixels`` given in `metadata`, as positive ints; None if one is unusable."""
    given = {k: metadata[k] for k in ("factor", "min_pixels", "max_pixels") if metadata.get(k) is not None}
    options = {k: _positive_int(v, MAX_COORD if k == "factor" else MAX_COORD**2) for k, v in given.items()}
    if any(v is None for v in options.values()):
        return None
    return {k: v for k, v in options.items() if v is not None}


def scale_factors(coord_space: str, metadata: dict[str, Any]) -> tuple[float, float] | None:
    """(sx, sy) mapping `coord_space` coordinates to original pixels; None if the metadata cannot tell (no usable
    image size, or resize options that are not positive integers)."""
    if coord_space == "pixel":
        return 1.0, 1.0
    size = image_size(metadata)
    if size is None or coord_space not in COORD_SPACES:
        return None
    w, h = size
    if coord_space == "norm1000":
        return w / 1000.0, h / 1000.0
    if coord_space == "norm1":
        return float(w), float(h)
    options = _resize_options(metadata)
    if options is None:
        return None
    try:
        rh, rw = smart_resize(h, w, **options)
    except (ValueError, ArithmeticError):
        return None
    return w / rw, h / rh


def fix_box(box: Box, fix_degenerate: bool = True) -> Box | None:
    """Swap reversed corners (fix_degenerate) or reject the box (None); well-formed boxes pass through."""
    if box.x2 >= box.x1 and box.y2 >= box.y1:
        return box
    if not fix_degenerate:
        return None
    return replace(
        box, x1=min(box.x1, box.x2), x2=max(box.x1, box.x2), y1=min(box.y1, box.y2), y2=max(box.y1, box.y2)
    )


def to_pixel_box(box: Box, factors: tuple[float, float], fix_degenerate: bool = True) -> Box | None:
    """`box` scaled by `factors` = (sx, sy) into original pixels, then `fix_box`."""
    sx, sy = factors
    scaled = replace(box, x1=box.x1 * sx, y1=box.y1 * sy, x2=box.x2 * sx, y2=box.y2 * sy)
    return fix_box(scaled, fix_degenerate)
