"""Typed records of the rollout stage: how to sample (`SamplingParams`), what comes back (`Group` of
`Completion`s), prompts given as text and images (`RawPrompt`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded

# `on_tokens(row, token_ids)`: tokens appended to completion `row` of a `generate` call (prompt i's completion j is
# row i * n + j), in order, the stop token included, nothing after it; a streaming caller decodes them as they come.
TokenCallback = Callable[[int, list[int]], None]


@dataclass(frozen=True)
class RawPrompt:
    """A prompt as its chat-templated text and its images in memory, for a caller that encodes prompts itself
    (the server): engines that take text and images (vllm) sample from these, engines that take token ids (hf)
    from `encoded`, which must then be given too."""

    text: str
    images: list[Image.Image]


def check_generate_args(n_prompts: int, n: int, seeds: Sequence[int] | None, encoded: Sequence[Encoded] | None,
                        raw: Sequence[RawPrompt] | None = None) -> None:
    """The argument checks every `RolloutEngine.generate` makes: n >= 1, one seed, one encoding and one raw prompt
    per prompt, and raw prompts only with their encodings."""
    if n < 1:
        raise ValueError(f"n (completions per prompt) must be >= 1, got {n}")
    if seeds is not None and len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    if encoded is not None and len(encoded) != n_prompts:
        raise ValueError(f"{len(encoded)} encoded prompts for {n_prompts} prompts")
    if raw is not None:
        if len(raw) != n_prompts:
            raise ValueError(f"{len(raw)} raw prompts for {n_prompts} prompts")
        if encoded is None:
            raise ValueError("raw prompts need their encodings (`encoded`): engines that sample from token ids "
                             "use those, and the vllm engine checks its prompt ids against them")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. temperature 0 = greedy. top_k 0 and top_p 1.0 = no truncation."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # completions per prompt (G); `RolloutEngine.generate` takes G as its own argument

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    """One sampled completion of a prompt.

    token_ids [T] (long): the sampled tokens; they end with the stop token (EOS) unless `truncated`.
    text: the tokens decoded with special tokens skipped (the stop token is not in the text).
    logprobs [T] (float32): log-probability of each sampled token under the distribution it was drawn from,
        i.e. log_softmax of the *processed* logits (vision tokens suppressed, then temperature, top-k, top-p).
    truncated: no stop token: `max_new_tokens` ran out (DAPO's "overlong" completions), or the call's
        `max_seconds` did, or its `should_stop()` turned True.
    """

    token_ids: torch.Tensor  # [T]
    text: str
    logprobs: torch.Tensor  # [T]
    truncated: bool

    @property
    def length(self) -> int:
        """T, the number of completion tokens (stop token included)."""
        return int(self.token_ids.numel())

    @property
    def finish_reason(self) -> str:
        """Why it ended, as OpenAI's API says it: "stop" (a stop token) or "length" (truncated)."""
        return "length" if self.truncated else "stop"


@dataclass
class Group:
    """A prompt and its G completions (GRPO's group).

    sample: the prompt's `Sample` (rewards read its answer, problem type and metadata).
    prompt: the prompt encoded once for all G completions: input_ids [L], pixel_values [P, D] or None,
        image_grid_thw [I, 3] or None (labels None); the caller's own when it passed `encoded`. The trainer reuses
        it, so images are processed once.
    completions: G `Completion`s, in sampling order.
    seed: the seed its sampling was derived from (None: drawn from the global torch RNG).
    """

    sample: Sample
    prompt: Encoded
    completions: list[Completion] = field(default_factory=list)
    seed: int | None = None

    @property
    def size(self) -> int:
        return len(self.completions)
