"""grounding: "Give the bounding box of the red circle as [x1, y1, x2, y2]." over 2-4 distinct shapes."""

from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageDraw

from vlrl.data.synth.base import COLOURS, KINDS, Item, Shape, Task, check_range, draw_shape, place, render

PAIRS = [(colour, kind) for colour in COLOURS for kind in KINDS]  # 12 distinct (colour, kind) targets
CHANCE_TRIALS = 20_000


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_of(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """The tight box of the shape's painted pixels, in pixel-edge coordinates: x2, y2 are one past the last
    painted column / row (a box [x1, y1, x2, y2] covers x1 <= x < x2), measured on the rendered mask."""
    mask = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(mask), shape, fill=255)
    bbox = mask.getbbox()
    assert bbox is not None
    return bbox


class Grounding(Task):
    """min_shapes..max_shapes shapes, each a different (colour, kind) pair, radius min_radius..max_radius,
    never touching. The target pair cycles through the 12 pairs with the slot; the answer is its box in
    pixels of the image as written (image_size [w, h], coord_space "pixel" in the record)."""

    name = "grounding"
    problem_type = "grounding"
    defaults = {"size": 112, "min_shapes": 2, "max_shapes": 4, "min_radius": 8, "max_radius": 18}

    def _check(self, p: dict[str, int]) -> None:
        super()._check(p)
        check_range(self.name, p, "min_shapes", "max_shapes", 1)
        check_range(self.name, p, "min_radius", "max_radius", 2)
        if p["max_shapes"] > len(PAIRS):
            raise ValueError(f"task {self.name!r}: max_shapes must be at most {len(PAIRS)}")

    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item:
        target = PAIRS[index % len(PAIRS)]
        k = rng.randint(p["min_shapes"], p["max_shapes"])
        pairs = [target] + rng.sample([q for q in PAIRS if q != target], k - 1)
        radii = [rng.randint(p["min_radius"], p["max_radius"]) for _ in pairs]
        centres = place(rng, radii, p["size"])
        shapes = [Shape(kind, colour, x, y, r) for (colour, kind), (x, y), r in zip(pairs, centres, radii)]
        order = list(range(k))
        rng.shuffle(order)  # drawing order: the target is not always first (shapes never overlap anyway)
        image = render([shapes[i] for i in order], p["size"])
        x1, y1, x2, y2 = box_of(shapes[0], p["size"])
        name = f"{target[0]} {target[1]}"
        question = f"Give the bounding box of the {name} as [x1, y1, x2, y2]."
        meta = {"image_size": [p["size"], p["size"]], "coord_space": "pixel", "target": name}
        return image, question, f"[{x1}, {y1}, {x2}, {y2}]", meta

    def _chance(self, p: dict[str, int]) -> float:
        return _chance_iou(p["size"], p["min_radius"], p["max_radius"])


@lru_cache(maxsize=64)
def _chance_iou(size: int, min_radius: int, max_radius: int) -> float:
    """P(IoU >= 0.5) between the true box and a random guess drawn from the same prior as the answers
    (a square of half-side uniform in min_radius..max_radius, centre uniform where the shape fits):
    fixed-seed Monte-Carlo over CHANCE_TRIALS pairs (about 0.02 at the defaults; standard error ~0.001)."""
    rng = random.Random(0)

    def draw_box() -> tuple[float, ...]:
        r = rng.randint(min_radius, max_radius)
        cx, cy = rng.randint(r + 2, size - 3 - r), rng.randint(r + 2, size - 3 - r)
        return (cx - r, cy - r, cx + r + 1, cy + r + 1)

    hits = sum(iou(draw_box(), draw_box()) >= 0.5 for _ in range(CHANCE_TRIALS))
    return hits / CHANCE_TRIALS
