"""Bar charts with letter-labelled bars: `chart` (which bar is tallest?), `chart_min` (which is shortest?) and
`chart_value` (read a value)."""

from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageDraw

from vlrl.data.synth.base import WHITE, Item, Task, check_range, draw_text_centred

LETTERS = "ABCDEFGH"
BAR = (70, 110, 180)
GREY = (120, 120, 120)
GRID = (200, 200, 200)
BLACK = (0, 0, 0)
TOP, LABEL_ROW, RIGHT_PAD = 6, 14, 6  # px: above the plot, under the axis for the letters, right of the bars


def draw_bars(
    size: int, heights: list[int], left: int, grid: list[tuple[int, str]] | None = None,
    colour: tuple[int, int, int] = BAR,
) -> Image.Image:
    """Bars of the given pixel heights standing on the x axis, letters A, B, ... centred under them.
    `grid`: (y, label) horizontal grid lines with tick labels left of the y axis."""
    image = _background(size, len(heights), left, tuple(grid or ())).copy()
    draw = ImageDraw.Draw(image)
    base = size - LABEL_ROW
    for (x0, width), h in zip(_bar_columns(size, len(heights), left), heights):
        draw.rectangle((x0, base - h, x0 + width - 1, base - 1), fill=colour)  # covers grid lines, not the axes
    return image


def _bar_columns(size: int, k: int, left: int) -> list[tuple[int, int]]:
    """(first column, width) of each of k bars."""
    slot = (size - RIGHT_PAD - left) / k
    width = max(3, round(slot * 0.6))
    return [(round(left + slot * i + (slot - width) / 2), width) for i in range(k)]


@lru_cache(maxsize=64)
def _background(size: int, k: int, left: int, grid: tuple[tuple[int, str], ...]) -> Image.Image:
    """Everything but the bars (grid, ticks, axes, letters): text drawing is the slow part, done once."""
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    base, right = size - LABEL_ROW, size - RIGHT_PAD
    for y, label in grid:
        draw.line((left, y, right, y), fill=GRID)
        draw.line((left - 3, y, left, y), fill=BLACK)
        draw_text_centred(draw, label, left - 9, y)
    for i, (x0, width) in enumerate(_bar_columns(size, k, left)):
        draw_text_centred(draw, LETTERS[i], x0 + (width - 1) / 2, base + LABEL_ROW / 2)
    draw.line((left, TOP, left, base), fill=BLACK)
    draw.line((left, base, right, base), fill=BLACK)
    return image


def _check_bars(task: Task, p: dict[str, int]) -> None:
    check_range(task.name, p, "min_bars", "max_bars", 2)
    if p["max_bars"] > len(LETTERS):
        raise ValueError(f"task {task.name!r}: max_bars must be at most {len(LETTERS)}")


class Chart(Task):
    """min_bars..max_bars bars, distinct heights, the tallest at least 10% of the plot height above the
    rest. The slot cycles through every (number of bars, tallest bar) pair: the answer is balanced for each
    bar count. Multiple choice among the letters shown."""

    name = "chart"
    problem_type = "multiple_choice"
    defaults = {"size": 112, "min_bars": 3, "max_bars": 4}

    def _check(self, p: dict[str, int]) -> None:
        super()._check(p)
        _check_bars(self, p)

    def _slots(self, p: dict[str, int]) -> list[tuple[int, int]]:
        return [(k, t) for k in range(p["min_bars"], p["max_bars"] + 1) for t in range(k)]

    superlative = "tallest"
    bar_colour = BAR

    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item:
        slots = self._slots(p)
        k, target = slots[index % len(slots)]
        plot = p["size"] - LABEL_ROW - TOP
        gap, sep = max(8, plot // 10), max(4, plot // 20)  # margin of the asked bar; separation of the others
        low = max(4, plot // 6)
        if self.superlative == "tallest":
            top = rng.randint(round(0.7 * plot), plot)
            special, candidates = top, range(low, top - gap + 1)
        else:
            bottom = rng.randint(low, round(0.4 * plot))
            special, candidates = bottom, range(bottom + gap, plot + 1)
        for _ in range(1000):
            others = sorted(rng.sample(candidates, k - 1))
            if all(b - a >= sep for a, b in zip(others, others[1:])):
                break
        else:
            raise ValueError(f"task {self.name!r}: cannot fit {k} clearly different bars in {p['size']}px")
        rng.shuffle(others)
        heights = others[:target] + [special] + others[target:]
        letters = list(LETTERS[:k])
        question = f"Which bar is the {self.superlative}? Choices: {', '.join(letters)}"
        image = draw_bars(p["size"], heights, left=6, colour=self.bar_colour)
        return image, question, letters[target], {"options": letters}

    def _chance(self, p: dict[str, int]) -> float:
        slots = self._slots(p)
        return sum(1.0 / k for k, _ in slots) / len(slots)


class ChartMin(Chart):
    """As `chart`, asking for the shortest bar (at least 10% of the plot height below the rest): a question
    `chart`'s demonstrations never ask, for an RL stage whose reward teaches what SFT did not."""

    name = "chart_min"
    superlative = "shortest"


class ChartGrey(Chart):
    """As `chart`, with grey bars instead of blue: the same question about a picture style the demo's SFT
    never shows. The demo's RL stage trains on it."""

    name = "chart_grey"
    bar_colour = GREY


class ChartValue(Task):
    """min_bars..max_bars bars over a y-axis grid 1..max_value (a grid line and tick label at every
    integer); each bar ends exactly on a grid line. "What is the value of bar X?" The asked value cycles
    with the slot (balanced); the asked bar and the other values are random."""

    name = "chart_value"
    problem_type = "numerical"
    defaults = {"size": 112, "min_bars": 3, "max_bars": 4, "max_value": 9}

    def _check(self, p: dict[str, int]) -> None:
        super()._check(p)
        _check_bars(self, p)
        if not 2 <= p["max_value"] <= (p["size"] - LABEL_ROW - TOP) // 9:
            raise ValueError(
                f"task {self.name!r}: max_value must be in 2..{(p['size'] - LABEL_ROW - TOP) // 9}"
            )

    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item:
        top_value = p["max_value"]
        value = 1 + index % top_value
        k = rng.randint(p["min_bars"], p["max_bars"])
        asked = rng.randrange(k)
        values = [value if i == asked else rng.randint(1, top_value) for i in range(k)]
        base = p["size"] - LABEL_ROW
        unit = (base - TOP) / top_value

        def y(v: int) -> int:
            return round(base - v * unit)

        grid = [(y(v), str(v)) for v in range(1, top_value + 1)]
        image = draw_bars(p["size"], [base - y(v) for v in values], left=16, grid=grid)
        question = f"What is the value of bar {LETTERS[asked]}?"
        return image, question, str(value), {"bar": LETTERS[asked]}

    def _chance(self, p: dict[str, int]) -> float:
        return 1.0 / p["max_value"]
