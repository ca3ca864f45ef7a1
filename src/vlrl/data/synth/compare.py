"""compare: "Are there more red shapes than blue shapes?" (yes_no, balanced, never a tie)."""

from __future__ import annotations

import random

from vlrl.data.synth.base import Item, Task, check_range, random_shapes, render


class Compare(Task):
    """Red and blue shapes (random kinds), min_count..max_count of each colour, the two counts never equal.
    Even slots answer "yes" (more red), odd slots "no"; the (more, fewer) pair is uniform among pairs."""

    name = "compare"
    problem_type = "yes_no"
    defaults = {"size": 112, "min_count": 1, "max_count": 6, "min_radius": 5, "max_radius": 8}

    def _check(self, p: dict[str, int]) -> None:
        super()._check(p)
        check_range(self.name, p, "min_count", "max_count", 0)
        check_range(self.name, p, "min_radius", "max_radius", 2)
        if p["max_count"] == p["min_count"]:
            raise ValueError(f"task {self.name!r}: min_count < max_count needed (the counts must differ)")

    def _generate(self, rng: random.Random, index: int, p: dict[str, int]) -> Item:
        counts = range(p["min_count"], p["max_count"] + 1)
        more, fewer = rng.choice([(a, b) for a in counts for b in counts if a > b])
        answer = "yes" if index % 2 == 0 else "no"
        n_red, n_blue = (more, fewer) if answer == "yes" else (fewer, more)
        colours = ["red"] * n_red + ["blue"] * n_blue
        rng.shuffle(colours)
        shapes = random_shapes(rng, colours, p["size"], p["min_radius"], p["max_radius"])
        meta = {"n_red": n_red, "n_blue": n_blue}
        return render(shapes, p["size"]), "Are there more red shapes than blue shapes?", answer, meta

    def _chance(self, p: dict[str, int]) -> float:
        return 0.5
