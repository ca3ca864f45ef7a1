"""The `hf` rollout engine: in-process sampling with Hugging Face `generate` (KV cache) on the policy itself.

One `generate` call per chunk of prompts, `num_return_sequences=G`: each prompt and its images are encoded
once (transformers encodes the images before expanding to G rows) and the `Group` keeps that encoding for
the trainer. Sampling goes through `SeededSampler` (see `vlrl.rollout.sampler`): vision tokens suppressed,
temperature / top-k / top-p as HF applies them, per-completion seeds, and the sampling log-probs recorded
from the processed logits. `generate`'s own processors are neutralised (repetition penalty 1, no top-k /
top-p / temperature of its own) so that a model's `generation_config.json` cannot silently change the
distribution RL samples from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded, collate
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.sampler import SeededSampler, row_seeds
from vlrl.rollout.types import Completion, Group, SamplingParams
from vlrl.train.batches import encode_for_generation


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus every EOS of the model's generation config (Qwen lists two)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, int):
        ids.add(gen)
    elif isinstance(gen, (list, tuple)):
        ids.update(int(i) for i in gen)
    if not ids:
        raise ValueError("no EOS token: neither the tokenizer nor the model's generation config defines one")
    return sorted(ids)


class HFEngine:
    """`RolloutEngine` over `model.generate`.

    max_prompts_per_call: prompts per `generate` call (0 = all at once); bounds the KV-cache memory to
        max_prompts_per_call * G rows.
    """

    name = "hf"

    def __init__(self, model: Any, processor: Any, *, device: torch.device | str | None = None,
                 max_prompts_per_call: int = 0) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_prompts_per_call = max_prompts_per_call
        self.suppress_ids = vision_token_ids(self.tokenizer)
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.image_id = image_token_id(processor)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op for the weights: this engine samples with the training module itself, so every optimizer
        step is already visible. (Passing another module makes the engine sample from that one.)"""
        self.model = model

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sample], n: int, sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Group]:
        if n < 1:
            raise ValueError(f"n (completions per prompt) must be >= 1, got {n}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        encoded = encode_for_generation(self.processor, prompts)
        chunk = self.max_prompts_per_call if self.max_prompts_per_call > 0 else len(prompts)
        was_training = self.model.training
        self.model.eval()
        groups: list[Group] = []
        try:
            for k in range(0, len(prompts), chunk):
                part = None if seeds is None else list(seeds[k : k + chunk])
                groups += self._generate_chunk(prompts[k : k + chunk], encoded[k : k + chunk], n, sampling, part)
        finally:
            self.model.train(was_training)
        return groups

    def _generate_kwargs(self, sampling: SamplingParams, n: int) -> dict[str, Any]:
        """`generate` arguments: our sampler does all sampling; HF's own warpers and penalties are neutral."""
        return dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            do_sample=True,  # multinomial over SeededSampler's one-hot scores: picks the sampler's token
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    def _generate_chunk(self, prompts: Sequence[Sample], encoded: Sequence[Encoded], n: int,
                        sampling: SamplingParams, seeds: list[int] | None) -> list[Group]:
        batch = collate(encoded, self.pad_id, self.image_id, padding_side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        sampler = SeededSampler(sampling, self.suppress_ids, row_seeds(seeds, n) if seeds is not None else None)
        out = self.model.generate(**batch, **self._generate_kwargs(sampling, n),
                                  logits_processor=LogitsProcessorList([sampler]))  # [N, L + T]
        new = out[:, batch["input_ids"].shape[1] :].cpu()  # [N, T]
        logps = sampler.stacked(new.shape[1]).cpu()  # [N, T]
        stop = torch.isin(new, torch.tensor(self.stop_ids))  # [N, T]
        has_stop = stop.any(dim=1)  # [N]; False = truncated
        first_stop = stop.int().argmax(dim=1)  # [N]; index of the first stop token (0 when there is none)
        lengths = torch.where(has_stop, first_stop + 1, new.shape[1])  # [N]; tokens after it are padding
        ids = [new[r, : int(lengths[r])].clone() for r in range(new.shape[0])]
        texts = self.tokenizer.batch_decode([t.tolist() for t in ids], skip_special_tokens=True)
        groups = []
        for i, (sample, enc) in enumerate(zip(prompts, encoded)):
            rows = range(i * n, (i + 1) * n)
            completions = [Completion(token_ids=ids[r], text=texts[r], logprobs=logps[r, : int(lengths[r])].clone(),
                                      truncated=not bool(has_stop[r])) for r in rows]
            groups.append(Group(sample=sample, prompt=enc, completions=completions,
                                seed=None if seeds is None else seeds[i]))
        return groups
