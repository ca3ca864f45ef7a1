"""Generation for the server: a rollout engine (`vlrl.rollout.base.make_engine`, the ones RL, eval and curate use:
`hf` in this process, or `vllm`, a vLLM worker) behind `ServedModel.generate(sample, images, sampling, stop, seed)`.

The server receives images inline, so it encodes each request itself (`encode_sample`: literal "<image>" text
restored after the placeholders became image slots) and passes the engine that encoding (what `hf` samples from)
and the same templated text with the images (`RawPrompt`: what `vllm` sends its worker, which checks that the ids
vLLM builds from them equal the encoding's), with one seed per request (the request's `seed`, else a fresh random
one), the wall-time bound `max_time` and the request's cancellation check `should_stop` (the app's "client is
gone"), which the engine polls while it generates. Stop strings cut the decoded text; usage counts come from the
completions' token ids. A streaming request also passes `on_text`, which hears each choice's text as the engine's
tokens arrive (`serve.textstream.TextStream`), the last piece once the choice is final.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample
from vlrl.models.inputs import Encoded, to_chat
from vlrl.models.processor import reserved_tokens
from vlrl.rollout.base import make_engine
from vlrl.rollout.types import Completion, RawPrompt, SamplingParams
from vlrl.rollout.vllm_engine import VLLMConfig
from vlrl.serve.schemas import LITERAL_IMAGE
from vlrl.serve.textstream import TextStream


class ContextLengthError(ValueError):
    """Prompt + max_tokens exceed the model's context; the message is safe to return to the client."""


class Cancelled(Exception):
    """The request was cancelled (its client is gone) before its generation began; nobody reads an answer."""


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


def request_text(processor: Any, sample: Sample) -> str:
    """The sample's chat-templated prompt text, with escaped literal "<image>" text restored after the
    placeholders became image slots (so request text may mention "<image>" without adding an image)."""
    chat = to_chat(sample.messages)
    for message in chat:
        for part in message["content"]:
            if part.get("type") == "text":
                part["text"] = part["text"].replace(LITERAL_IMAGE, IMAGE_PLACEHOLDER)
    return str(processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def encode_sample(processor: Any, sample: Sample, images: list[Image.Image], text: str | None = None) -> Encoded:
    """`models.inputs.encode_prompt` of the sample's `request_text` (`text`, when the caller has it already)."""
    text = request_text(processor, sample) if text is None else text
    batch = processor(text=[text], images=images or None, padding=False, return_tensors="pt")
    return Encoded(
        input_ids=batch["input_ids"][0],  # [L]
        labels=None,
        pixel_values=batch.get("pixel_values"),  # [P, D] (Qwen-VL) or [N tiles, 3, H, W] (InternVL)
        image_grid_thw=batch.get("image_grid_thw"),  # [I, 3] (Qwen-VL) or None
    )


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _choice(tok: Any, completion: Completion, stop: Sequence[str]) -> Choice:
    """A completion as a `Choice`: its text cut at the first stop string ("stop"), else as the engine ended it
    ("stop" at a stop token, "length" when max_tokens or max_time ran out). Usage: the completion's tokens (its
    stop token included), or the tokens of the text kept before a stop string."""
    text, stopped = _cut_at_stop(completion.text, stop)
    if stopped:
        return Choice(text=text, completion_tokens=len(tok(text, add_special_tokens=False)["input_ids"]),
                      finish_reason="stop")
    return Choice(text=text, completion_tokens=completion.length, finish_reason=completion.finish_reason)


class ServedModel:
    """One local model behind the server: `generate(sample, images, sampling, stop, seed, should_stop)` through
    one rollout engine built at start: `hf` (its `LeanStep` weight copy loaded once: the served weights do not
    change), or `vllm` with `vllm` settings (colocated by default: the engine saves the model and starts a vLLM
    worker, `VLLMEngineError` when it cannot). `close()` stops what the engine runs beside this process.

    max_time: wall-time bound of one request's generation (its completions then end with finish_reason "length").
    reserved_tokens: the processor's vision tokens (Qwen-VL's `<|image_pad|>`, ...; InternVL's `<IMG_CONTEXT>`,
    `<img>`, ...), which the app refuses in request text.
    Not thread-safe: the app calls it under a lock, one request at a time."""

    def __init__(self, model: Any, processor: Any, model_id: str, *, device: str = "cpu",
                 max_time: float | None = None, engine: str = "hf", vllm: VLLMConfig | None = None) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.model_id = model_id
        self.max_time = max_time
        self.context = max_context(model)
        self.reserved_tokens = reserved_tokens(processor)
        kwargs: dict[str, Any] = ({"config": vllm if vllm is not None else VLLMConfig()} if engine == "vllm"
                                  else {"device": device, "reload_weights": False})
        self.engine = make_engine(engine, self.model, processor, **kwargs)

    def close(self) -> None:
        """Stop what the engine runs beside this process (the `vllm` engine's colocated worker; `hf` has nothing)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def generate(self, sample: Sample, images: list[Image.Image], sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
        """`sampling.n` completions of `sample.messages` with `images` standing at its `<image>` placeholders.

        Raises `ContextLengthError` when the prompt plus `sampling.max_new_tokens` exceed the model's context;
        `ValueError` from the processor (e.g. an image of extreme aspect ratio) propagates. Equal `seed`s give
        equal completions; greedy (temperature 0) decodes once and repeats it n times. `should_stop` is checked
        before encoding (`Cancelled` when True) and polled by the engine while it generates (`hf`: after every
        decode step; the completions then end there, with finish_reason "length"), so an abandoned request soon
        stops costing model time. `on_text(choice, text)`, when given, hears each choice's text in pieces as it is
        generated (called from the generating thread; the pieces of a choice add up to its final text)."""
        if should_stop is not None and should_stop():
            raise Cancelled("the request was cancelled before generation")
        text = request_text(self.processor, sample)
        enc = encode_sample(self.processor, sample, images, text)
        prompt_len = int(enc.input_ids.shape[0])
        if prompt_len + sampling.max_new_tokens > self.context:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_new_tokens}) exceed the model's "
                f"context of {self.context} tokens"
            )
        runs = 1 if sampling.greedy else sampling.n
        seed = secrets.randbits(63) if seed is None else seed
        streams = [TextStream(self.processor.tokenizer, stop) for _ in range(runs)] if on_text else []

        def on_tokens(row: int, ids: list[int]) -> None:
            _tell(on_text, row, streams[row].push(ids), sampling.n // runs)

        group = self.engine.generate([sample], runs, sampling, seeds=[seed], encoded=[enc],
                                     raw=[RawPrompt(text, images)], max_seconds=self.max_time,
                                     should_stop=should_stop, on_tokens=on_tokens if on_text else None)[0]
        choices = [_choice(self.processor.tokenizer, c, stop) for c in group.completions]
        for row, (stream, choice) in enumerate(zip(streams, choices)):
            _tell(on_text, row, stream.finish(choice.text), sampling.n // runs)
        if runs < sampling.n:
            choices = [Choice(c.text, c.completion_tokens, c.finish_reason) for c in choices * sampling.n]
        return GenerationResult(prompt_tokens=prompt_len, choices=choices)


def _tell(on_text: Callable[[int, str], None] | None, row: int, text: str, copies: int) -> None:
    """Send `text` of engine row `row` to its choices: the row itself, or every choice when greedy decoding ran
    once for all of them (`copies` = n)."""
    if on_text is None or not text:
        return
    for choice in range(row, row + copies):
        on_text(choice, text)
