"""The rollout-engine interface: prompts in, groups of sampled completions out.

    engine = make_engine("hf", model, processor)
    groups = engine.generate(samples, n=G, sampling=SamplingParams(max_new_tokens=64, temperature=1.0),
                             seeds=[mix_seed(run_seed, position) for position in positions])
    ...optimizer step...
    engine.sync_weights(model)

`seeds` (one per prompt, optional) makes each prompt's G completions a function of (its seed, its logits)
only, whatever batch, rank or world size it is sampled in: the trainer derives them from the run seed and
the prompt's position in the data stream, so a resumed or re-sharded run samples the same completions.
`encoded` (one `Encoded` per prompt, optional) replaces the engine's own encoding of the prompts: a caller holding
its images in memory (the server) passes its encoding instead of `Sample.images` paths, and with it `raw` (one
`RawPrompt` per prompt: its chat-templated text and images), which engines that sample from text and images (vllm)
send instead of rendering `Sample.messages` and reading `Sample.images`. `max_seconds` bounds the call's wall time,
and `should_stop` (polled while generating) ends it when it returns True: the completions still running then end
without a stop token (`truncated`, finish "length"). `on_tokens` (`vlrl.rollout.types.TokenCallback`) receives each
completion's tokens as they are sampled (`hf`: after every decode step; `vllm`: each completion whole, when its
worker answers), so the server can stream them; by the time `generate` returns, every completion's tokens have
been reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded
from vlrl.rollout.types import Group, RawPrompt, SamplingParams, TokenCallback


@runtime_checkable
class RolloutEngine(Protocol):
    """What RL, curate and the server need from a sampler."""

    def generate(
        self, prompts: Sequence[Sample], n: int, sampling: SamplingParams, *, seeds: Sequence[int] | None = None,
        encoded: Sequence[Encoded] | None = None, raw: Sequence[RawPrompt] | None = None,
        max_seconds: float | None = None, should_stop: Callable[[], bool] | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> list[Group]:
        """`n` completions for each prompt, one `Group` per prompt in the prompts' order. `seeds`, when
        given, holds one seed per prompt; equal (prompt, seed, weights) give equal completions. `encoded`, when
        given, holds each prompt's encoding (then `Sample.images` are not read), `raw` (only with `encoded`) each
        prompt's text and images; `max_seconds` bounds the wall time, `should_stop` ends the call early,
        `on_tokens` hears the tokens as they come (see the module docstring)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (call after each optimizer step)."""
        ...


def _hf(model: Any, processor: Any, **kwargs: Any) -> RolloutEngine:
    from vlrl.rollout.hf_engine import HFEngine

    return HFEngine(model, processor, **kwargs)


def _vllm(model: Any, processor: Any, **kwargs: Any) -> RolloutEngine:
    from vlrl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model, processor, **kwargs)


ENGINES: dict[str, Callable[..., RolloutEngine]] = {"hf": _hf, "vllm": _vllm}


def make_engine(name: str, model: Any, processor: Any, **kwargs: Any) -> RolloutEngine:
    """Build the engine registered as `name` ("hf", "vllm"); an unknown name lists the valid ones."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](model, processor, **kwargs)
