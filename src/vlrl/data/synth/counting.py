"""counting: "How many shapes are in the image?" over 1-6 non-overlapping shapes (numerical)."""

from __future__ import annotations

import random

from vlrl.data.synth.base import COLOURS, Item, Task, check_range, random_shapes, render


class Counting(Task):
    """min_count..max_count filled circles / squares / triangles in the 4 colours, radius
    min_radius..max_radius px, never touching. The count cycles with the slot: labels are balanced."""

    name = "counting"
    problem_type = "numerical"
    defaults = {"size": 112, "min_count": 1, "max_count": 6, "min_radius": 6, "max_radius": 11}

    def _check(self, p: dict[str, int]) -> None:
        super()._check(p)
        check_range(self.name, p, "min_count", "max_count", 0)
        check_range(self.name, p, "min_radius", "max_radius", 2)

    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item:
        n = p["min_count"] + index % (p["max_count"] - p["min_count"] + 1)
        colours = [rng.choice(list(COLOURS)) for _ in range(n)]
        shapes = random_shapes(rng, colours, p["size"], p["min_radius"], p["max_radius"])
        return render(shapes, p["size"]), "How many shapes are in the image?", str(n), {}

    def _chance(self, p: dict[str, int]) -> float:
        return 1.0 / (p["max_count"] - p["min_count"] + 1)
