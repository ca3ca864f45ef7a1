"""A batch-invariant, per-completion-seeded sampler that runs inside Hugging Face `generate`.

Why not `generate(do_sample=True)` as is: HF draws every row's token with one `torch.multinomial` call on
the global RNG, so a prompt's completions depend on which other prompts share its batch, and therefore on
the world size and on how prompts are chunked. RL needs the same prompt to get the same completions
whatever rank or batch it lands in (exact world-size invariance, exact resume).

`SeededSampler` is a `LogitsProcessor` placed last in the chain. At each step, for every row it
  1. suppresses the vision tokens (a random or weak VLM samples them; calibration.md),
  2. applies HF's own warpers in HF's order: temperature, top-k, top-p,
  3. records log_softmax of these processed logits at the chosen token (the *sampling log-prob*),
  4. draws the token with the exponential-race form of the Gumbel-max trick,
     argmax_v p_v / E_v with E_v ~ Exp(1) i.i.d. (an exact draw from p; vLLM's sampler does the same),
     with the noise from the row's own `torch.Generator`, seeded from (prompt seed, completion index),
  5. returns scores that are 0 at the chosen token and -inf elsewhere, so `generate`'s own sampling step
     (softmax + multinomial on a one-hot distribution) can only pick that token.
Everything a row sees is a function of its own logits and its own generator: the draw is batch-invariant
(up to floating-point differences in the logits themselves between batch shapes).

Without seeds the noise comes from the global torch RNG (one draw per step for the whole batch); then the
checkpointed torch RNG state is what makes a resumed run sample the same completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlrl.rollout.types import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 over the parts): (run seed, prompt key, j) -> seed.

    Neighbouring inputs (prompt 7 vs 8) give unrelated generator streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def row_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """One seed per row of a `num_return_sequences=n` batch (prompt-major: rows i*n .. i*n+n-1)."""
    return [mix_seed(s, j) for s in prompt_seeds for j in range(n)]


class SeededSampler(LogitsProcessor):
    """See the module docstring. `logprobs` holds one `[N]` tensor per call (per generated position)."""

    def __init__(
        self,
        sampling: SamplingParams,
        suppress_ids: Sequence[int],
        seeds: Sequence[int] | None = None,
    ) -> None:
        self.sampling = sampling
        self.suppress_ids = list(suppress_ids)
        self.seeds = list(seeds) if seeds is not None else None
        self.logprobs: list[torch.Tensor] = []
        self._generators: list[torch.Generator] | None = None
        self._warpers: list[LogitsProcessor] = []
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                self._warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                self._warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(top_p=sampling.top_p))

    def processed(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: the logits actually sampled from, `[N, V]` float32."""
        scores = scores.float().clone()  # [N, V]
        if self.suppress_ids:
            scores[:, self.suppress_ids] = float("-inf")
        for warp in self._warpers:
            scores = warp(input_ids, scores)
        return scores

    def _noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """-log E, E ~ Exp(1) i.i.d. `[N, V]`: row r from generator r (or all from the global RNG)."""
        if self.seeds is None:
            return -torch.empty(shape, device=device).exponential_().log()
        if len(self.seeds) != shape[0]:
            raise ValueError(f"{len(self.seeds)} row seeds for a batch of {shape[0]} rows")
        if self._generators is None:
            self._generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        rows = [torch.empty(shape[1], device=device).exponential_(generator=g) for g in self._generators]
        return -torch.stack(rows).log()  # [N, V]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = self.processed(input_ids, scores)  # [N, V]
        logp = torch.log_softmax(logits, dim=-1)  # [N, V]
        if self.sampling.greedy:
            choice = logits.argmax(dim=-1)  # [N]
        else:
            choice = (logp + self._noise(logp.shape, logp.device)).argmax(dim=-1)  # [N]
        self.logprobs.append(logp.gather(1, choice[:, None]).squeeze(1))  # [N]
        out = torch.full_like(logits, float("-inf"))  # [N, V]
        out.scatter_(1, choice[:, None], 0.0)
        return out  # type: ignore[return-value]

    def stacked(self, steps: int) -> torch.Tensor:
        """The recorded log-probs of the first `steps` positions, `[N, steps]` (generate may run, then undo,
        a few extra steps when it defers its stop check)."""
        if not 0 < steps <= len(self.logprobs):
            raise ValueError(f"asked for {steps} positions, {len(self.logprobs)} recorded")
        return torch.stack(self.logprobs[:steps], dim=1)  # [N, steps]
