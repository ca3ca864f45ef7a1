"""Shared-prefix forwards: a group's prompt (and its images) runs once, its key/value cache serves all the
group's completions.

    family = family_of_model(model)
    prompts = prompt_inputs([g.prompt for g in distinct_groups], pad_id, image_id)     # U left-padded prompts
    first, cache, next_pos = prefill(model, prompts)                                  # [U, V], KV of [U, L]
    cache = expand_cache(cache, index, capacity)                                      # KV of [b, L], b = rows
    logits = model(input_ids=tokens, attention_mask=continuation_mask(...),
                   position_ids=text_positions(next_pos, start, n, family), **cache_arg(cache), use_cache=True).logits

Used by the `hf` engine (prefill at B prompts, cache expanded to B*G rows and pre-allocated for the decode loop)
and by the training and reference log-probs (`vlrl.train.logprobs`: prompt forward at the micro-batch's distinct
groups, cache expanded to its rows by a differentiable `index_select`, so gradients from every completion flow
back into the one prompt forward). The prompt's last position predicts each completion's first token, so a
completion of T tokens needs only its first T - 1 tokens as input.

Positions are the model family's (`vlrl.models.families`): Qwen-VL's 3-D M-RoPE from its rope index, text after
the prompt continuing 1-D on the three axes; InternVL's plain 1-D positions counted over each row's real tokens.
Either way every token after the prompt is text, at `next_pos` + its offset. The forward gets only the inputs
its family takes (`Family.model_inputs`: no `mm_token_type_ids` for InternVL).

The shared prefix needs full-attention dynamic cache layers: `shared_prefix_unsupported` says why a model cannot
take it (the training forwards then use the plain [prompt | completion] layout).

With activation checkpointing (transformers' `activation_checkpointing_enable`), which replays each layer in the
backward, a cache that a layer writes to would be written twice, so transformers drops it in checkpointed layers.
The training path composes with it instead: the prompt pass runs its cache-writing (text decoder) layers without
checkpointing (`prompt_pass`: they run at the distinct prompts only, a fraction of the micro-batch's tokens), and
the completions read a cache whose layers never change (`expand_cache` without capacity: `update` returns the
prefix with the new states appended and keeps nothing), which a replay reads the same way, so the decoder layers
keep it under checkpointing (`completion_pass`: transformers' `_can_checkpoint_with_cache`, meant for layers that
only read the cache).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from vlrl.models.cache_name import cache_of
from vlrl.models.families import QWEN_VL, Family, family_of_model
from vlrl.models.inputs import Encoded, collate


def prompt_inputs(prompts: Sequence[Encoded], pad_id: int, image_id: int) -> dict[str, Tensor]:
    """Left-padded prompt tensors: input_ids / attention_mask / mm_token_type_ids [U, L], pixel_values [P, D] and
    image_grid_thw [I, 3] when any prompt has images (`prefill` passes on what the model's family takes)."""
    return collate(prompts, pad_id, image_id, padding_side="left")


def prompt_positions(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(position_ids of the left-padded prompts: [3, U, L] for Qwen-VL, [U, L] for InternVL; next_pos [U]: the
    position of the first token after each prompt), as the model's family computes them."""
    return family_of_model(model).prompt_positions(model, inputs)


def text_positions(next_pos: Tensor, start: int, count: int, family: Family = QWEN_VL) -> Tensor:
    """Positions of tokens start .. start + count - 1 after each row's prompt (`next_pos` [b]) in `family`'s
    layout: [3, b, count] (Qwen-VL, the default), [b, count] (InternVL)."""
    return family.text_positions(next_pos, start, count)


def prefill(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Cache, Tensor]:
    """Run the prompts once (images encoded here); returns (logits at each prompt's last position [U, V], the KV
    cache of the prompts, next_pos [U]). Gradients flow if enabled."""
    family = family_of_model(model)
    pos, next_pos = family.prompt_positions(model, inputs)
    out = model(**family.model_inputs(inputs), position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], cache_of(out), next_pos


class BufferLayer(DynamicLayer):
    """One layer's KV cache in buffers [b, H, capacity, D] allocated once: `update` writes the new states in place
    and returns views of the filled part (no per-token concatenation). Without `capacity` (the differentiable
    training path, where in-place writes would break autograd) it is read-only: `update` returns the prefix with
    the new states appended and keeps nothing, so one forward of the completions, or its replay under activation
    checkpointing, sees the same states."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int | None = None) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = keys.shape[-2]
        self.capacity = capacity
        self._k: Tensor = keys  # [b, H, capacity or length, D]
        self._v: Tensor = values
        if capacity is not None:
            self._k = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
            self._k[:, :, : self.length] = keys
            self._v[:, :, : self.length] = values
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        n = key_states.shape[-2]
        if self.capacity is None:
            return torch.cat([self._k, key_states], dim=-2), torch.cat([self._v, value_states], dim=-2)
        if self.length + n > self.capacity:
            raise ValueError(f"KV buffer full: {self.length} + {n} > {self.capacity}")
        else:
            self._k[:, :, self.length : self.length + n] = key_states
            self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._views()
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


def expand_cache(cache: Cache, index: Tensor, capacity: int | None = None) -> Cache:
    """A cache whose row r holds the prompt KV of row `index[r]` of `cache` (`index_select`: differentiable).
    With `capacity`, every layer is pre-allocated to `capacity` positions for decoding."""
    layers: list[Any] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise TypeError(f"shared-prefix forwards need full-attention dynamic cache layers, got {type(layer).__name__}")
        layers.append(BufferLayer(keys.index_select(0, index), values.index_select(0, index), capacity))
    return Cache(layers=layers)


def continuation_mask(prompt_mask: Tensor, extra: Tensor) -> Tensor:
    """2-D attention mask [b, L + n] of prompt rows [b, L] followed by `extra` [b, n] continuation positions."""
    return torch.cat([prompt_mask, extra.to(prompt_mask)], dim=1)


def uses_activation_checkpointing(model: Any) -> bool:
    """Whether any layer of `model` is checkpointed (replayed in the backward) in training forwards."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def cache_layers(model: Any) -> list[GradientCheckpointingLayer]:
    """The checkpointable layers that take the KV cache (the text decoder's; vision blocks take none)."""
    out = []
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            params = inspect.signature(type(m).forward).parameters
            if "cache" in params or "past_key_values" in params:
                out.append(m)
    return out


@contextlib.contextmanager
def prompt_pass(model: Any) -> Iterator[None]:
    """The prompt forward of a training step: its cache-writing layers run without activation checkpointing
    (a replay would write the cache a second time), and the models around them keep `use_cache` (transformers
    turns it off in a checkpointed model); the vision blocks stay checkpointed."""
    vision = {id(m) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)} - {
        id(m) for m in cache_layers(model)}
    paused = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and id(m) not in vision]
    for m in paused:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in paused:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def completion_pass(model: Any) -> Iterator[None]:
    """The completions' forward against a read-only prefix cache (`expand_cache` without capacity): checkpointed
    layers keep the cache, which their replay reads unchanged."""
    layers = [m for m in cache_layers(model) if "_can_checkpoint_with_cache" not in vars(m)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache  # back to the class's own value


def shared_prefix_unsupported(model: Any) -> str | None:
    """Why the shared-prefix forward cannot run on `model` (None: it can): sliding-window attention layers keep no
    full cache to expand."""
    text = model.config.get_text_config() if hasattr(model, "config") else None
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return "sliding-window attention layers"
    return None
