"""Training log-probs on InternVL (`vlrl.train.logprobs` through the family adapter): every layout -- shared
prefix on / off, shared vision features on / off -- gives each row the log-probs of an independent, unpadded
forward of the model on [prompt | completion] (within 1e-5) and the same gradients, with prompts of different
lengths, a three-tile image, a text-only prompt and micro-batches that split groups. Where a layout cannot be
taken (a family without shared vision features, sliding-window layers) the plain one runs, logged once."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from PIL import Image, ImageDraw
from random_groups import random_groups

from vlrl.data.loading import load_samples
from vlrl.models import families
from vlrl.models.build import init_model
from vlrl.models.families import INTERNVL
from vlrl.models.inputs import collate, encode_for_generation, encode_prompt
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import Group
from vlrl.train import logprobs
from vlrl.train.logprobs import build_rows, row_logprobs, rows_logprobs_nograd, use_shared_prefix

LENGTHS = [[5, 1, 3], [2, 6, 6], [4, 4, 1], [3, 2, 5]]  # completion lengths per group
TEMPERATURE = 1.3
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wide_image() -> Image.Image:
    image = Image.new("RGB", (224, 112), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    return image


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory: pytest.TempPathFactory):
    folder = init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)
    model, processor = load_model_and_processor(folder, max_pixels=4 * 112 * 112)
    model.train()
    samples = [load_samples([str(synth_dir / task / "train.jsonl")])[0] for task in ("counting", "chart")]
    encoded = encode_for_generation(processor, samples)
    question = [{"role": "user", "content": "<image>How many shapes are there?"}]
    encoded.append(encode_prompt(processor, question, [_wide_image()]))  # 2 tiles + a thumbnail
    encoded.append(encode_prompt(processor, [{"role": "user", "content": "Count to three."}], []))
    assert [0 if e.pixel_values is None else e.pixel_values.shape[0] for e in encoded] == [1, 1, 3, 0]
    assert len({len(e.input_ids) for e in encoded}) == 4  # four prompt lengths: left padding matters
    return model, processor, random_groups(processor, samples, encoded, LENGTHS)


def _ids(processor) -> tuple[int, int]:
    return processor.tokenizer.pad_token_id, image_token_id(processor)


def _kw(processor) -> dict:
    return dict(temperature=TEMPERATURE, suppress_ids=vision_token_ids(processor.tokenizer), device=CPU)


def _reference(model, processor, group: Group, j: int) -> torch.Tensor:
    """Log-probs [T] of completion j from one unpadded forward of prompt + completion, InternVL's own inputs."""
    prompt, ids = group.prompt, group.completions[j].token_ids
    item = type(prompt)(torch.cat([prompt.input_ids, ids]), None, prompt.pixel_values, None)
    batch = collate([item], *_ids(processor), mm_token_type_ids=False)
    with torch.no_grad():
        logits = model(**batch).logits[0].float() / TEMPERATURE  # [L + T, V]
    logits[:, vision_token_ids(processor.tokenizer)] = float("-inf")
    n = len(prompt.input_ids)
    logp = torch.log_softmax(logits[n - 1 : n - 1 + len(ids)], dim=-1)  # [T, V]
    return logp.gather(1, ids[:, None]).squeeze(1)


LAYOUTS = [(True, True), (True, False), (False, True), (False, False)]  # (shared_prefix, share_vision)
ROWS = [
    [(g, j) for g in range(4) for j in range(3)],  # whole groups
    [(2, 1), (0, 0), (3, 2), (2, 0), (1, 2)],  # groups split and interleaved, the three-tile prompt twice
]


@pytest.mark.parametrize("rows", ROWS)
def test_every_layout_gives_the_models_logprobs_and_the_same_gradients(setup, rows):
    model, processor, groups = setup
    refs = [_reference(model, processor, groups[g], j) for g, j in rows]
    results = []
    for shared_prefix, share_vision in LAYOUTS:
        m = copy.deepcopy(model)
        batch = build_rows(groups, rows, *_ids(processor), share_vision=share_vision, shared_prefix=shared_prefix)
        out = row_logprobs(m, groups, batch, with_entropy=True, **_kw(processor))
        for r, ref in enumerate(refs):
            got = out.logp[r, : len(ref)].detach()
            assert float((got - ref).abs().max()) < 1e-5, (shared_prefix, share_vision, got, ref)
        weights = torch.linspace(-1.0, 1.0, out.logp.numel()).view_as(out.logp)
        (out.logp * weights).sum().backward()
        results.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    plain = results[-1]
    tower = [n for n in plain if "vision_tower" in n]
    assert tower and len(plain) > 0.9 * len(list(model.parameters()))  # the vision tower included
    for grads in results[:-1]:
        assert grads.keys() == plain.keys()
        worst = max(float((grads[k] - plain[k]).abs().max()) for k in plain)
        assert worst < 1e-5, worst


def test_nograd_logprobs_of_every_layout(setup):
    model, processor, groups = setup
    rows = [(g, j) for g in range(4) for j in range(3)]
    pad, img = _ids(processor)
    refs = [_reference(model, processor, groups[g], j) for g, j in rows]
    for shared_prefix, share_vision in LAYOUTS:
        out = rows_logprobs_nograd(model, groups, rows, micro_batch_size=5, pad_id=pad, image_id=img,
                                   share_vision=share_vision, shared_prefix=shared_prefix, **_kw(processor))
        assert model.training  # restored
        for got, ref in zip(out, refs):
            assert got.shape == ref.shape and float((got - ref).abs().max()) < 1e-5


def test_a_family_without_shared_vision_gets_pixels_per_row(setup, monkeypatch, caplog):
    """The fall-back is the plain path: the same inputs as share_vision=False, so the same logits, logged once."""
    model, processor, groups = setup
    rows = [(0, 0), (2, 1), (2, 2), (3, 0)]
    pad, img = _ids(processor)
    with torch.no_grad():
        per_row = row_logprobs(model, groups, build_rows(groups, rows, pad, img, share_vision=False),
                               **_kw(processor)).logp
    no_sharing = dataclasses.replace(INTERNVL, select_images=None)
    monkeypatch.setattr(logprobs, "family_of_model", lambda _m: no_sharing)
    monkeypatch.setattr(families, "_LOGGED", set())
    batch = build_rows(groups, rows, pad, img, share_vision=True)
    assert batch.groups_with_images == [0, 2]
    with caplog.at_level(logging.INFO, logger="vlrl.train.logprobs"), torch.no_grad():
        got = [row_logprobs(model, groups, batch, **_kw(processor)).logp for _ in range(2)]
    assert torch.equal(got[0], per_row) and torch.equal(got[1], per_row)
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["internvl cannot share vision features between rows: pixel_values per row"]


def test_shared_prefix_falls_back_where_the_model_cannot_take_it(setup, monkeypatch, caplog):
    model, _, _ = setup
    monkeypatch.setattr(families, "_LOGGED", set())
    assert use_shared_prefix(model, True) and not use_shared_prefix(model, False)
    monkeypatch.setattr(model.config.get_text_config(), "layer_types", ["sliding_attention"] * 4)
    with caplog.at_level(logging.INFO, logger="vlrl.train.logprobs"):
        assert not use_shared_prefix(model, True) and not use_shared_prefix(model, True)
    assert [r.getMessage() for r in caplog.records] == [
        "shared prefix off for InternVLForConditionalGeneration (sliding-window attention layers): "
        "plain [prompt | completion] rows"]
