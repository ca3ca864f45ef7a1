"""The `hf` engine on InternVL (transformers' `InternVLForConditionalGeneration`, the second model family): 1-D
positions from the family adapter, a forward without Qwen's extras, seeded sampling whose log-probs equal a
teacher-forced forward of the model on the same tokens, with `LeanStep` (InternVL's Qwen2 text decoder re-laid)
and without, and the fall-back to the model's forward (logged once) when `LeanStep` cannot take the model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlrl.data.loading import load_samples
from vlrl.data.sample import Sample
from vlrl.models import families
from vlrl.models.build import init_model
from vlrl.models.families import INTERNVL, family_of_model
from vlrl.models.inputs import collate, encode_for_generation
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams
from vlrl.rollout.hf_engine import HFEngine
from vlrl.rollout.lean_step import LeanStep
from vlrl.rollout.prefix import prefill, prompt_inputs, prompt_positions, text_positions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE = 112


@pytest.fixture(scope="module")
def internvl(tmp_path_factory: pytest.TempPathFactory):
    """The tiny InternVL; its processor allows up to 4 tiles per image (a wide image: 2 tiles + a thumbnail)."""
    folder = init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)
    model, processor = load_model_and_processor(folder, max_pixels=4 * TILE * TILE)
    model.eval()
    return model, processor


def _wide_sample(folder: Path) -> Sample:
    image = Image.new("RGB", (2 * TILE, TILE), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    ImageDraw.Draw(image).rectangle((150, 30, 200, 90), fill="blue")
    path = folder / "wide.png"
    image.save(path)
    return Sample("wide", [str(path)], [{"role": "user", "content": "<image>How many shapes are there?"}], "2",
                  "numerical")


@pytest.fixture(scope="module")
def prompts(synth_dir, tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """Prompts of different token lengths (left padding): one-tile counting and chart items, a three-tile image,
    a text-only prompt."""
    out = load_samples([str(synth_dir / "counting" / "train.jsonl")])[:1]
    out += load_samples([str(synth_dir / "chart" / "train.jsonl")])[:1]
    out.append(_wide_sample(tmp_path_factory.mktemp("wide")))
    out.append(Sample("text", [], [{"role": "user", "content": "Count to three."}], "3", "numerical"))
    return out


def _teacher_forced(model, processor, prompt, token_ids: torch.Tensor, suppress: list[int]) -> torch.Tensor:
    """Log-probs of `token_ids` after `prompt` from one unpadded forward of prompt + completion (no cache)."""
    item = type(prompt)(torch.cat([prompt.input_ids, token_ids]), None, prompt.pixel_values, None)
    batch = collate([item], processor.tokenizer.pad_token_id, image_token_id(processor),
                    mm_token_type_ids=INTERNVL.mm_token_type_ids)
    with torch.no_grad():
        logits = model(**batch).logits[0].float()  # [L + T, V]
    logits[:, suppress] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)  # [L + T, V]
    n = len(prompt.input_ids)
    return logp[n - 1 : n - 1 + len(token_ids)].gather(1, token_ids[:, None]).squeeze(1)  # [T]


def test_positions_are_1d_and_the_forward_gets_no_qwen_extras(internvl, prompts):
    model, processor = internvl
    assert family_of_model(model) is INTERNVL
    encoded = encode_for_generation(processor, prompts)
    assert [int(e.pixel_values.shape[0]) if e.pixel_values is not None else 0 for e in encoded] == [1, 1, 3, 0]
    inputs = prompt_inputs(encoded, processor.tokenizer.pad_token_id, image_token_id(processor))
    mask = inputs["attention_mask"]  # [U, L]
    assert len(set(mask.sum(-1).tolist())) == 4  # four prompt lengths: left padding
    pos, next_pos = prompt_positions(model, inputs)
    assert pos.shape == mask.shape and torch.equal(next_pos, mask.sum(-1))
    for row, m in zip(pos, mask):
        assert row[m.bool()].tolist() == list(range(int(m.sum())))  # real tokens counted from 0
    assert torch.equal(text_positions(next_pos, 2, 3, INTERNVL), next_pos[:, None] + torch.tensor([2, 3, 4]))
    seen: dict[str, object] = {}
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            first, _, _ = prefill(model, inputs)
    finally:
        handle.remove()
    assert "mm_token_type_ids" in inputs and "mm_token_type_ids" not in seen and "image_grid_thw" not in seen
    assert seen["position_ids"] is not None and first.shape == (4, model.config.text_config.vocab_size)


@pytest.mark.parametrize("lean", [True, False])
def test_sampling_logprobs_equal_teacher_forcing(internvl, prompts, lean):
    model, processor = internvl
    engine = HFEngine(model, processor, lean_step=lean)
    suppress = vision_token_ids(processor.tokenizer)
    groups = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, temperature=1.0), seeds=[3, 4, 5, 6])
    assert (engine._step is not None) == lean  # InternVL's Qwen2 decoder is LeanStep's
    assert all(g.size == 3 for g in groups)
    worst = 0.0
    for g in groups:
        for c in g.completions:
            assert c.length > 0 and not torch.isin(c.token_ids, torch.tensor(suppress)).any()
            ref = _teacher_forced(model, processor, g.prompt, c.token_ids, suppress)
            worst = max(worst, float((c.logprobs - ref).abs().max()))
    assert worst < 1e-5, worst
    again = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, temperature=1.0), seeds=[3, 4, 5, 6])
    assert [c.token_ids.tolist() for g in groups for c in g.completions] == [
        c.token_ids.tolist() for g in again for c in g.completions]  # seeded


def test_lean_decode_equals_the_models_forward(internvl, prompts):
    """Rows stopping at different steps (a third of the vocabulary stops a row) drop out of the batch mid-decode:
    LeanStep's completions and log-probs are the model forward's."""
    model, processor = internvl
    assert LeanStep.supports(model)
    lean, plain = HFEngine(model, processor, lean_step=True), HFEngine(model, processor, lean_step=False)
    lean.stop_ids = plain.stop_ids = list(range(0, model.config.text_config.vocab_size, 3))
    sampling = SamplingParams(max_new_tokens=10, temperature=1.2)
    a = [c for g in lean.generate(prompts, 4, sampling, seeds=[0, 1, 2, 3]) for c in g.completions]
    b = [c for g in plain.generate(prompts, 4, sampling, seeds=[0, 1, 2, 3]) for c in g.completions]
    assert len({c.length for c in a}) > 2
    for x, y in zip(a, b):
        assert torch.equal(x.token_ids, y.token_ids)
        assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5), (x.logprobs, y.logprobs)


def test_unsupported_decoder_falls_back_and_says_so_once(internvl, prompts, caplog, monkeypatch):
    model, processor = internvl
    monkeypatch.setattr(families, "_LOGGED", set())  # other tests may have logged it already
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    want = HFEngine(model, processor, lean_step=False).generate(prompts[:2], 2, sampling, seeds=[7, 8])
    handle = model.model.language_model.register_forward_hook(lambda _m, _i, out: out)  # LeanStep would skip it
    try:
        assert LeanStep.unsupported(model) == "forward hooks on the model"
        engine = HFEngine(model, processor, lean_step=True)
        with caplog.at_level(logging.INFO, logger="vlrl.rollout.hf_engine"):
            got = engine.generate(prompts[:2], 2, sampling, seeds=[7, 8])
            engine.generate(prompts[:2], 2, sampling, seeds=[7, 8])
    finally:
        handle.remove()
    assert engine._step is None
    notes = [r.getMessage() for r in caplog.records if "LeanStep does not support" in r.getMessage()]
    assert notes == ["LeanStep does not support InternVLForConditionalGeneration (forward hooks on the model): "
                     "decoding with the model's own forward"]
    for x, y in zip([c for g in got for c in g.completions], [c for g in want for c in g.completions]):
        assert torch.equal(x.token_ids, y.token_ids) and torch.equal(x.logprobs, y.logprobs)


def test_text_decoders_lean_step_does_not_cover(internvl, monkeypatch):
    """InternVL with a text model outside LeanStep's math (here Llama as a stand-in) gets no LeanStep."""
    model, _ = internvl
    text = model.model.language_model
    assert INTERNVL.text_decoder(model) is text
    monkeypatch.setattr(text.config, "model_type", "llama")
    assert INTERNVL.text_decoder(model) is None
    assert LeanStep.unsupported(model) == "no Qwen2 / Qwen3 text decoder of a known family"
