"""What every synthetic task shares: the `Task` interface, shapes, placement and drawing."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

from PIL import Image, ImageDraw, ImageFont

# (image, question, answer, extra metadata for the record)
Item = tuple[Image.Image, str, str, dict[str, Any]]

WHITE = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (20, 150, 50),
    "orange": (245, 150, 0),
}
KINDS = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Shape:
    """A filled shape inscribed in the square [cx - r, cx + r] x [cy - r, cy + r] (pixel indices)."""

    kind: str
    colour: str
    cx: int
    cy: int
    r: int


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, int, int] | int | None = None
) -> None:
    x0, y0, x1, y1 = shape.cx - shape.r, shape.cy - shape.r, shape.cx + shape.r, shape.cy + shape.r
    colour = COLOURS[shape.colour] if fill is None else fill
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape.kind == "triangle":
        draw.polygon([(shape.cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; valid: {', '.join(KINDS)}")


def render(shapes: list[Shape], size: int) -> Image.Image:
    """The shapes on a white size x size RGB canvas (no anti-aliasing: crisp, exact colours)."""
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def place(
    rng: random.Random, radii: list[int], size: int, gap: int = 3, margin: int = 2, tries: int = 200
) -> list[tuple[int, int]]:
    """Centres for squares of half-sides `radii` that stay `margin` px inside the canvas and whose bounding
    squares are at least `gap` px apart (so no two shapes touch). Raises ValueError when they do not fit."""
    for _ in range(tries):
        centres: list[tuple[int, int]] = []
        for r in radii:
            lo, hi = r + margin, size - 1 - r - margin
            if lo > hi:
                raise ValueError(f"a shape of radius {r} does not fit on a {size}px canvas")
            for _ in range(100):
                c = (rng.randint(lo, hi), rng.randint(lo, hi))
                if all(
                    abs(c[0] - o[0]) > r + ro + gap or abs(c[1] - o[1]) > r + ro + gap
                    for o, ro in zip(centres, radii)
                ):
                    centres.append(c)
                    break
            else:
                break  # start this layout again
        if len(centres) == len(radii):
            return centres
    raise ValueError(f"could not place {len(radii)} shapes on a {size}px canvas; use fewer or smaller shapes")


def random_shapes(
    rng: random.Random,
    colours: list[str],
    size: int,
    min_radius: int,
    max_radius: int,
    kinds: list[str] | None = None,
) -> list[Shape]:
    """One non-overlapping shape per entry of `colours`, random kind (or the given kinds) and radius."""
    radii = [rng.randint(min_radius, max_radius) for _ in colours]
    centres = place(rng, radii, size)
    kinds = kinds if kinds is not None else [rng.choice(KINDS) for _ in colours]
    return [Shape(k, c, x, y, r) for k, c, (x, y), r in zip(kinds, colours, centres, radii)]


@lru_cache(maxsize=1)
def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in default font (same glyphs on every machine with the same Pillow)."""
    return ImageFont.load_default()


def draw_text_centred(draw: ImageDraw.ImageDraw, text: str, cx: float, cy: float) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font())
    draw.text(
        (round(cx - (left + right) / 2), round(cy - (top + bottom) / 2)), text, fill=(0, 0, 0), font=font()
    )


class Task(ABC):
    """A synthetic task: subclasses set `name`, `problem_type`, `defaults`; implement `_generate`, `_chance`.

    generate(rng, index, **params): one item. `index` is a balancing slot: a task derives its label from
        `index` (cycling through its labels) so that any run of consecutive slots is balanced; everything
        else comes from `rng`. The image must be a function of the scene only (it is the item's identity).
    chance(**params): accuracy of uniform guessing among the valid answers.
    """

    name: ClassVar[str]
    problem_type: ClassVar[str]
    defaults: ClassVar[dict[str, int]]

    def params(self, overrides: dict[str, Any]) -> dict[str, int]:
        """Defaults updated by `overrides`; an unknown name is an error listing the valid ones."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"task {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"valid: {', '.join(self.defaults)}"
            )
        merged = {**self.defaults, **{k: int(v) for k, v in overrides.items()}}
        self._check(merged)
        return merged

    def _check(self, p: dict[str, int]) -> None:
        """Raise ValueError on parameters that make no sense together (subclasses extend, calling super)."""
        if p.get("size", 64) < 64:
            raise ValueError(f"task {self.name!r}: size must be at least 64, got {p['size']}")

    def generate(self, rng: random.Random, index: int, **params: Any) -> Item:
        return self._generate(rng, index, self.params(params))

    def chance(self, **params: Any) -> float:
        return self._chance(self.params(params))

    @abstractmethod
    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item: ...

    @abstractmethod
    def _chance(self, p: dict[str, int]) -> float: ...


def check_range(task: str, p: dict[str, int], low: str, high: str, minimum: int) -> None:
    if p[low] < minimum or p[high] < p[low]:
        raise ValueError(f"task {task!r}: need {minimum} <= {low} <= {high}, got {p[low]}, {p[high]}")
