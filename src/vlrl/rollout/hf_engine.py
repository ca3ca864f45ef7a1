"""The `hf` rollout engine: in-process sampling with the policy itself, in a lean decode loop of its own.

Per chunk of B prompts, G completions each (`vlrl.rollout.prefix`):
  1. prefill: the B prompts run once, at batch B (each image preprocessed once, by `encode_for_generation`, and
     encoded once); the `Group` keeps that encoding for the trainer;
  2. their key/value cache is copied G times into buffers pre-allocated for prompt + `max_new_tokens` positions
     (`BufferLayer`: each new token's keys and values are written in place, no per-token concatenation);
  3. decode: one forward of the B*G rows per new token, positions continued from each prompt's in the model
     family's layout (`vlrl.models.families`: Qwen-VL's M-RoPE, InternVL's 1-D), and `SeededSampler.sample`
     (vision tokens masked by a bias built once, temperature / top-k / top-p as HF applies them, per-completion
     seeds, the sampling log-probs recorded) -- no `generate` machinery per token. The loop
     stops when every row has produced a stop token or `max_new_tokens` are out; rows that have stopped drop out
     of the batch once a quarter of the rows have (their cache rows are compacted away), or when the call's
     `max_seconds` are out or the call's `should_stop()` returns True (both checked after each token: every row has
     at least one; the server cancels a request whose client is gone this way).
On CPU, the decode step runs on a copy of the text decoder's weights laid out for small-batch products
(`vlrl.rollout.lean_step.LeanStep`, built at the first `generate` call and reloaded with the current weights at
every later one, or only after `sync_weights` with `reload_weights=False`; `lean_step=False` or a model it does
not support: the model's own forward, the reason logged once). On CPU, seeded prompts can be decoded in shards
by concurrent Python threads (`decode_threads` > 1).
A model's `generation_config.json` has no say in the distribution RL samples from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from vlrl.data.sample import Sample
from vlrl.models.cache_name import cache_arg
from vlrl.models.families import family_of_model, log_fallback
from vlrl.models.inputs import Encoded, encode_for_generation
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.lean_step import LeanStep
from vlrl.rollout.prefix import continuation_mask, expand_cache, prefill, prompt_inputs
from vlrl.rollout.sampler import SeededSampler, row_seeds
from vlrl.rollout.types import (
    Completion,
    Group,
    RawPrompt,
    SamplingParams,
    TokenCallback,
    check_generate_args,
)

log = logging.getLogger(__name__)


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
    """`RolloutEngine` over the policy's forward (see the module docstring).

    max_prompts_per_call: prompts per prefill + decode loop (0 = all at once); bounds the KV-cache memory to
        max_prompts_per_call * G rows.
    decode_threads: on CPU, seeded prompts are split into this many shards decoded concurrently by Python threads,
        each with one intra-op thread (torch's thread count is set to 1 for the rollout and restored); 1 (default):
        one batch on all of torch's intra-op threads; None: one shard per intra-op thread. A decode step is many
        small ops; as one OpenMP team each op is a fork / join. On an idle machine one team is faster; when other
        processes hold the cores each fork / join waits for a time slice and independent shards win
        (benchmarks/README.md has the measurements). The completions do not change (per-completion seeds;
        tested), only the batch shapes. Unseeded sampling (the global RNG) and GPUs decode in one shard.
    lean_step: on CPU, decode with `LeanStep` when the model supports it: its weight layout suits the decode
        step's few-row matrix products, so the rollout is faster (benchmarks/README.md). The engine then keeps a
        copy of the text decoder's weights (4 bytes per parameter in fp32) between calls.
    reload_weights: copy the model's weights into that `LeanStep` at every `generate` (True: the policy may have
        changed in place since the last call); False: at the first call and after `sync_weights` only, for a
        model whose weights stay fixed (the server).
    """

    name = "hf"

    def __init__(self, model: Any, processor: Any, *, device: torch.device | str | None = None,
                 max_prompts_per_call: int = 0, decode_threads: int | None = 1, lean_step: bool = True,
                 reload_weights: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_prompts_per_call = max_prompts_per_call
        self.decode_threads = decode_threads
        self.lean_step = lean_step
        self.reload_weights = reload_weights
        self._step: LeanStep | None = None  # kept between calls (its buffers are reused), reloaded at each call
        self._step_of: Any = None  # the module it was built from
        self._synced = False  # sync_weights was called since the step's last load
        self.suppress_ids = vision_token_ids(self.tokenizer)
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.image_id = image_token_id(processor)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op for the weights: this engine samples with the training module itself, so every optimizer
        step is already visible. (Passing another module makes the engine sample from that one.) The `LeanStep`
        copy is reloaded at the next `generate` (also with `reload_weights=False`)."""
        self.model = model
        self._synced = True

    def _workers(self, n_prompts: int, seeded: bool) -> int:
        if self.device.type != "cpu" or not seeded:
            return 1
        wanted = self.decode_threads if self.decode_threads is not None else torch.get_num_threads()
        return max(1, min(wanted, n_prompts))

    def generate(
        self, prompts: Sequence[Sample], n: int, sampling: SamplingParams, *, seeds: Sequence[int] | None = None,
        encoded: Sequence[Encoded] | None = None, raw: Sequence[RawPrompt] | None = None,
        max_seconds: float | None = None, should_stop: Callable[[], bool] | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> list[Group]:
        """`RolloutEngine.generate`: `encoded` replaces the encoding of `prompts` (`raw` is checked, not used: this
        engine samples from the token ids); `max_seconds` ends the decode loop of a chunk once that wall time has
        passed since this call began, `should_stop` (called after each token) once it returns True; `on_tokens`
        hears each row's token after every decode step (from the decoding thread)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        check_generate_args(len(prompts), n, seeds, encoded, raw)
        if not prompts:
            return []
        if encoded is None:
            encoded = encode_for_generation(self.processor, prompts)
        workers = self._workers(len(prompts), seeds is not None)
        chunk = self.max_prompts_per_call if self.max_prompts_per_call > 0 else len(prompts)
        chunk = min(chunk, -(-len(prompts) // workers))
        parts = [(k, k + chunk) for k in range(0, len(prompts), chunk)]

        @torch.no_grad()
        def run(lo: int, hi: int) -> list[Group]:  # grad mode is per thread
            part = None if seeds is None else list(seeds[lo:hi])
            report = None if on_tokens is None else _offset_rows(on_tokens, lo * n)
            return self._generate_chunk(prompts[lo:hi], encoded[lo:hi], n, sampling, part, step, deadline,
                                        should_stop, report)

        was_training, threads = self.model.training, torch.get_num_threads()
        self.model.eval()
        step = self._lean_step()
        try:
            if workers == 1:
                return [g for lo, hi in parts for g in run(lo, hi)]
            torch.set_num_threads(1)
            with ThreadPoolExecutor(workers) as pool:
                return [g for groups in pool.map(lambda p: run(*p), parts) for g in groups]
        finally:
            torch.set_num_threads(threads)
            self.model.train(was_training)

    def _lean_step(self) -> LeanStep | None:
        """The `LeanStep` for this call, loaded with the model's current weights (None: decode with the model)."""
        if not (self.lean_step and self.device.type == "cpu"):
            return None
        reason = LeanStep.unsupported(self.model)
        if reason is not None:
            log_fallback(log, f"LeanStep does not support {type(self.model).__name__} ({reason}): "
                              "decoding with the model's own forward")
            return None
        if self._step is None or self._step_of is not self.model:
            self._step, self._step_of = LeanStep(self.model), self.model
        elif self.reload_weights or self._synced:
            self._step.load_(self.model)
        self._synced = False
        return self._step

    def _generate_chunk(self, prompts: Sequence[Sample], encoded: Sequence[Encoded], n: int,
                        sampling: SamplingParams, seeds: list[int] | None, step: LeanStep | None = None,
                        deadline: float | None = None, should_stop: Callable[[], bool] | None = None,
                        on_tokens: TokenCallback | None = None) -> list[Group]:
        sampler = SeededSampler(sampling, self.suppress_ids, row_seeds(seeds, n) if seeds is not None else None)
        new = self._decode(encoded, n, sampling.max_new_tokens, sampler, step, deadline=deadline,
                           should_stop=should_stop, on_tokens=on_tokens)  # [N, T]
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

    def _decode(self, encoded: Sequence[Encoded], n: int, max_new: int, sampler: SeededSampler,
                step: LeanStep | None = None, *, deadline: float | None = None,
                should_stop: Callable[[], bool] | None = None, on_tokens: TokenCallback | None = None) -> Tensor:
        """Prefill the prompts at batch B, expand to B*n rows, decode up to `max_new` tokens, or fewer once
        `time.monotonic()` passes `deadline` or `should_stop()` is True: [B*n, T] (CPU)."""
        inputs = {k: v.to(self.device) for k, v in prompt_inputs(encoded, self.pad_id, self.image_id).items()}
        rows = torch.arange(len(encoded), device=self.device).repeat_interleave(n)  # [N]: row -> prompt
        first, cache, next_pos = prefill(self.model, inputs)  # [B, V], KV of [B, L], [B]
        prompt_len = inputs["input_ids"].shape[1]
        cache = expand_cache(cache, rows, capacity=prompt_len + max_new)
        mask = continuation_mask(inputs["attention_mask"].index_select(0, rows),
                                 torch.ones(len(rows), max_new, dtype=torch.long, device=self.device))  # [N, L + T]
        bias = torch.zeros(mask.shape).masked_fill_(mask == 0, float("-inf")) if step is not None else None  # [N, L + T]
        next_pos = next_pos.index_select(0, rows)  # [N]
        family = family_of_model(self.model)
        stop = torch.tensor(self.stop_ids, device=self.device)
        out = torch.full((len(rows), max_new), self.pad_id, dtype=torch.long)  # [N, T]
        live = torch.arange(len(rows))  # [n_live]: the output rows still in the batch
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)  # [n_live]: has produced a stop token
        logits = first.index_select(0, rows)  # [N, V]
        logps: list[Tensor] = []
        for t in range(max_new):
            tokens = sampler.sample(logits)  # [n_live]
            step_logp = torch.zeros(len(rows))  # [N]
            step_logp[live] = sampler.logprobs.pop().float().cpu()
            logps.append(step_logp)
            out[live, t] = tokens.cpu()
            if on_tokens is not None:  # rows that stopped before this step have nothing more to say
                for row, token, finished in zip(live.tolist(), tokens.tolist(), done.tolist()):
                    if not finished:
                        on_tokens(row, [token])
            done |= torch.isin(tokens, stop)
            if t == max_new - 1 or bool(done.all()) or (deadline is not None and time.monotonic() >= deadline):
                break
            if should_stop is not None and should_stop():
                break
            if 4 * int(done.sum()) >= len(live):  # a quarter of the rows have stopped: drop them from the batch
                keep = (~done).nonzero().squeeze(1)  # [n_keep]
                live, tokens, done = live[keep.cpu()], tokens[keep], done[keep]
                mask, next_pos = mask[keep], next_pos[keep]
                bias = bias[keep] if bias is not None else None
                cache.batch_select_indices(keep)
                sampler.select_rows(keep)
            if step is not None and bias is not None:
                logits = step(tokens, next_pos + t, cache, bias[:, : prompt_len + t + 1])  # [n_live, V]
            else:
                out_t = self.model(input_ids=tokens[:, None], attention_mask=mask[:, : prompt_len + t + 1],
                                   position_ids=family.text_positions(next_pos, t, 1), **cache_arg(cache),
                                   use_cache=True)
                logits = out_t.logits[:, -1]  # [n_live, V]
        sampler.logprobs = logps
        return out[:, : len(logps)]


def _offset_rows(on_tokens: TokenCallback, offset: int) -> TokenCallback:
    """`on_tokens` for a chunk of the call's prompts whose first row is row `offset` of the call."""
    return lambda row, ids: on_tokens(offset + row, ids)
