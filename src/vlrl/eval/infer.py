"""`vlrl infer`: one question, one answer — the first check every user runs."""

from __future__ import annotations

from vlrl.data.sample import IMAGE_PLACEHOLDER, Sample
from vlrl.data.templates import apply_template
from vlrl.models.loading import load_model_and_processor
from vlrl.rollout.hf import generate_texts
from vlrl.rollout.types import SamplingParams


def infer(model_dir: str, images: list[str], prompt: str, *, thinking: bool = False, max_new_tokens: int = 256,
          temperature: float = 0.0) -> str:
    from pathlib import Path

    for p in images:
        if not Path(p).exists():
            raise FileNotFoundError(f"image {p} does not exist")
    model, processor = load_model_and_processor(model_dir)
    text = prompt if prompt.count(IMAGE_PLACEHOLDER) == len(images) else IMAGE_PLACEHOLDER * len(images) + prompt
    messages = [{"role": "user", "content": text}]
    if thinking:
        messages = apply_template(messages, "thinking")
    sample = Sample(id="infer", images=[str(Path(p).resolve()) for p in images], messages=messages, answer="",
                    problem_type="free_form")
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    return generate_texts(model, processor, [sample], sampling)[0][0]
