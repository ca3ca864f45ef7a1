"""Generation for the server: `rollout.hf.generate_texts` with in-memory PIL images and token counts.

`generate_texts` loads a `Sample`'s images from paths and returns strings only; the server receives images
inline and must report usage and finish reasons, so this variant takes the decoded images and keeps the
token ids. Same encoding (`encode_prompt` + left-padded `collate`) and the same sampling arguments
(vision tokens suppressed, `<|im_end|>` as end of sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample
from vlrl.models.inputs import Encoded, collate, to_chat
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.types import SamplingParams
from vlrl.serve.schemas import LITERAL_IMAGE


class ContextLengthError(ValueError):
    """Prompt + max_tokens exceed the model's context; the message is safe to return to the client."""


@dataclass
class Choice:
    """One completion: its text, how many tokens it used and why it ended ("stop" | "length")."""

    text: str
    completion_tokens: int
    finish_reason: str


@dataclass
class GenerationResult:
    """All completions of one request; `prompt_tokens` counts the prompt once (vision tokens included)."""

    prompt_tokens: int
    choices: list[Choice]


def max_context(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "max_position_embeddings", 4096))


def encode_sample(processor: Any, sample: Sample, images: list[Image.Image]) -> Encoded:
    """`models.inputs.encode_prompt` of the sample, with escaped literal "<image>" text restored after the
    placeholders became image slots (so request text may mention "<image>" without adding an image)."""
    chat = to_chat(sample.messages)
    for message in chat:
        for part in message["content"]:
            if part.get("type") == "text":
                part["text"] = part["text"].replace(LITERAL_IMAGE, IMAGE_PLACEHOLDER)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=images or None, padding=False, return_tensors="pt")
    return Encoded(
        input_ids=batch["input_ids"][0],  # [L]
        labels=None,
        pixel_values=batch.get("pixel_values"),  # [P, D]
        image_grid_thw=batch.get("image_grid_thw"),  # [I, 3]
    )


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _choices(tok: Any, rows: torch.Tensor, stop: Sequence[str]) -> list[Choice]:
    """Decode generated rows [n, T]; a row ends at its first eos ("stop") or runs out ("length")."""
    out = []
    for row in rows.tolist():
        n_tokens, reason = len(row), "length"
        if tok.eos_token_id in row:
            n_tokens, reason = row.index(tok.eos_token_id) + 1, "stop"
        text = tok.decode(row[:n_tokens], skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop)
        if stopped:
            reason = "stop"
            n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        out.append(Choice(text=text, completion_tokens=n_tokens, finish_reason=reason))
    return out


@torch.no_grad()
def generate_chat(
    model: Any,
    processor: Any,
    sample: Sample,
    images: list[Image.Image],
    sampling: SamplingParams,
    *,
    stop: Sequence[str] = (),
    max_time: float | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> GenerationResult:
    """`sampling.n` completions of `sample.messages` with `images` standing at its `<image>` placeholders.

    Raises `ContextLengthError` when the prompt plus `sampling.max_new_tokens` exceed the model's context;
    `ValueError` from the processor (e.g. an image of extreme aspect ratio) propagates. `max_time` bounds the
    wall time of `generate` (the completions then end with finish_reason "length")."""
    tok = processor.tokenizer
    enc = encode_sample(processor, sample, images)
    prompt_len = int(enc.input_ids.shape[0])
    limit = max_context(model)
    if prompt_len + sampling.max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_new_tokens}) exceed the model's "
            f"context of {limit} tokens"
        )
    batch = collate([enc], tok.pad_token_id, image_token_id(processor), padding_side="left")
    batch = {k: v.to(device) for k, v in batch.items()}
    n_runs = 1 if sampling.greedy else sampling.n  # greedy: one run, copied n times (HF refuses n > 1)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=n_runs,
        suppress_tokens=vision_token_ids(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_time=max_time,
    )
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    if seed is not None:
        torch.manual_seed(seed)  # the caller serialises generation, so the global RNG is ours here
    out = model.generate(**batch, **kwargs)  # [n_runs, L + T]
    rows = out[:, batch["input_ids"].shape[1]:]  # [n_runs, T]
    choices = _choices(tok, rows, stop)
    if n_runs == 1 and sampling.n > 1:
        choices = [Choice(c.text, c.completion_tokens, c.finish_reason) for c in choices * sampling.n]
    return GenerationResult(prompt_tokens=prompt_len, choices=choices)


class HFEngine:
    """One local model behind the server: `generate(sample, images, sampling, stop, seed)`.

    Not thread-safe: the app calls it under a lock, one request at a time."""

    def __init__(self, model: Any, processor: Any, model_id: str, *, device: str = "cpu",
                 max_time: float | None = None) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.max_time = max_time
        self.context = max_context(model)

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None) -> GenerationResult:
        return generate_chat(self.model, self.processor, sample, images, sampling, stop=stop,
                             max_time=self.max_time, seed=seed, device=self.device)
