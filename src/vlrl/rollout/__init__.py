"""Rollout engines behind one interface: `generate(prompts, n, sampling, seeds=) -> groups`, `sync_weights(model)`.

`hf` (in-process, the policy's own forward in a decode loop of its own, KV cache) works everywhere and is what RL,
eval, infer, curate and serve generate with by default; `vllm` samples in a vLLM worker process of its own
environment (`vlrl.rollout.vllm_engine`), colocated or as a server.
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
