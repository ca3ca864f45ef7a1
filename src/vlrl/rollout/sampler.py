"""A batch-invariant, per-completion-seeded sampler: `sample(logits)` in the `hf` engine's own decode loop, or a
`LogitsProcessor` inside Hugging Face `generate`.

Why not `generate(do_sample=True)` as is: HF draws every row's token with one `torch.multinomial` call on
the global RNG, so a prompt's completions depend on which other prompts share its batch, and therefore on
the world size and on how prompts are chunked. RL needs the same prompt to get the same completions
whatever rank or batch it lands in (exact world-size invariance, exact resume).

At each step, for every row `SeededSampler` (placed last when used as a `LogitsProcessor`)
  1. suppresses the vision tokens (image placeholders, not text, which a random or weak VLM still samples) by
     adding a [V] bias of 0 / -inf built once,
  2. applies HF's own warpers in HF's order: temperature, top-k, top-p,
  3. records log_softmax of these processed logits at the chosen token (the *sampling log-prob*),
  4. draws the token with the exponential-race form of the Gumbel-max trick,
     argmax_v p_v / E_v with E_v = -log U_v ~ Exp(1) i.i.d. (an exact draw from p; vLLM's sampler does the same),
     with the noise from the row's own `torch.Generator`, seeded from (prompt seed, completion index),
  5. `sample` returns the chosen tokens; as a `LogitsProcessor` it returns scores that are 0 at the chosen token
     and -inf elsewhere, so `generate`'s own sampling step (softmax + multinomial on a one-hot distribution)
     can only pick that token.
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
        self._bias: torch.Tensor | None = None  # [V] 0 / -inf, built on first use (vision tokens masked once)
        self._warpers: list[LogitsProcessor] = []
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                self._warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                self._warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(top_p=sampling.top_p))

    def processed(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: the logits actually sampled from, `[N, V]` float32 (a new tensor). `input_ids` is unused by
        these warpers (HF's interface passes it)."""
        if self._bias is None or self._bias.shape[0] != scores.shape[-1] or self._bias.device != scores.device:
            self._bias = torch.zeros(scores.shape[-1], device=scores.device)  # [V]: -inf at the suppressed ids
            if self.suppress_ids:
                self._bias[self.suppress_ids] = float("-inf")
        scores = scores.float() + self._bias  # [N, V]
        for warp in self._warpers:
            scores = warp(input_ids, scores)  # type: ignore[arg-type]
        return scores

    def _noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """-log E with E = -log U ~ Exp(1), U ~ Uniform[0, 1) i.i.d. `[N, V]`: row r from generator r (or all from
        the global RNG). (`torch.rand` + log, because `exponential_` with a generator is slower on CPU.)"""
        if self.seeds is None:
            uniform = torch.rand(shape, device=device)
        else:
            if len(self.seeds) != shape[0]:
                raise ValueError(f"{len(self.seeds)} row seeds for a batch of {shape[0]} rows")
            if self._generators is None:
                self._generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
            uniform = torch.stack([torch.rand(shape[1], device=device, generator=g) for g in self._generators])
        return -(-uniform.log()).log()  # [N, V]; U = 0 gives -inf: that token is not drawn (probability 2^-24)

    def sample(self, scores: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 1-4 on raw logits `[N, V]`: the chosen tokens `[N]`; their log-probs are appended to `logprobs`."""
        logits = self.processed(input_ids, scores)  # [N, V]
        logp = torch.log_softmax(logits, dim=-1)  # [N, V]
        if self.sampling.greedy:
            choice = logits.argmax(dim=-1)  # [N]
        else:
            choice = (logp + self._noise(logp.shape, logp.device)).argmax(dim=-1)  # [N]
        self.logprobs.append(logp.gather(1, choice[:, None]).squeeze(1))  # [N]
        return choice

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """As a `LogitsProcessor` inside `generate`: step 5, scores that only let the sampled token through."""
        choice = self.sample(scores, input_ids)  # [N]
        out = torch.full_like(scores, float("-inf"), dtype=torch.float32)  # [N, V]
        out.scatter_(1, choice[:, None], 0.0)
        return out  # type: ignore[return-value]

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` [n_keep] for the following steps (their generators continue their streams)."""
        idx = keep.tolist()
        if self.seeds is not None:
            self.seeds = [self.seeds[i] for i in idx]
        if self._generators is not None:
            self._generators = [self._generators[i] for i in idx]

    def stacked(self, steps: int) -> torch.Tensor:
        """The recorded log-probs of the first `steps` positions, `[N, steps]` (generate may run, then undo,
        a few extra steps when it defers its stop check)."""
        if not 0 < steps <= len(self.logprobs):
            raise ValueError(f"asked for {steps} positions, {len(self.logprobs)} recorded")
        return torch.stack(self.logprobs[:steps], dim=1)  # [N, steps]
