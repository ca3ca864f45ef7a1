"""Typed records of the rollout stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. temperature 0 = greedy."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # completions per prompt (G)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
