"""Rollout engines behind one interface: `generate(prompts, n, sampling, seeds=) -> groups`, `sync_weights(model)`.

`hf` (in-process `model.generate`, KV cache) works everywhere; `vllm` is an optional GPU extra (a stub that
raises a clear error for now). `generate_texts` (in `hf.py`) is the plain decoding helper eval uses.
"""

from vlrl.rollout.base import ENGINES, RolloutEngine, make_engine
from vlrl.rollout.sampler import SeededSampler, mix_seed, row_seeds
from vlrl.rollout.types import Completion, Group, SamplingParams

__all__ = [
    "ENGINES",
    "Completion",
    "Group",
    "RolloutEngine",
    "SamplingParams",
    "SeededSampler",
    "make_engine",
    "mix_seed",
    "row_seeds",
]
