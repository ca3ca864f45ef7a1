"""The vLLM rollout engine: an optional GPU extra (`pip install vlrl[gpu]`), not implemented yet.

Building it raises a clear error instead of pretending: without vLLM installed (it needs CUDA) it says so;
with vLLM installed it says the engine is not written yet. The `hf` engine is the working one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded
from vlrl.rollout.types import Group, SamplingParams


class VLLMEngine:
    """Placeholder for a vLLM-backed `RolloutEngine` (colocated or server mode)."""

    def __init__(self, model: Any, processor: Any, **kwargs: Any) -> None:
        try:
            import vllm  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "rollout engine 'vllm': vllm is not installed / GPU only (install the `gpu` extra on a CUDA "
                "machine); use rollout_engine=hf"
            ) from err
        raise NotImplementedError("rollout engine 'vllm' is not implemented yet; use rollout_engine=hf")

    def generate(
        self,
        prompts: Sequence[Sample],
        n: int,
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        encoded: Sequence[Encoded] | None = None,
        max_seconds: float | None = None,
    ) -> list[Group]:
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError
