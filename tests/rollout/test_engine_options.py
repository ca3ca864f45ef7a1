"""The `hf` engine's options for callers other than RL: prompts encoded by the caller (`encoded`), a wall-time
bound (`max_seconds`), each completion's finish reason, and a `LeanStep` loaded once for fixed weights
(`reload_weights=False`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlrl.data.loading import load_samples
from vlrl.models.inputs import encode_for_generation
from vlrl.models.loading import load_model_and_processor
from vlrl.rollout import SamplingParams
from vlrl.rollout.hf_engine import HFEngine
from vlrl.rollout.lean_step import LeanStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(synth_dir):
    return load_samples([str(synth_dir / "counting" / "train.jsonl")])[:2]


def _ids(groups):
    return [c.token_ids.tolist() for g in groups for c in g.completions]


def test_encoded_prompts_replace_the_engines_encoding(tiny, prompts):
    model, processor = tiny
    eng = HFEngine(model, processor)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0)
    own = eng.generate(prompts, 3, sp, seeds=[4, 5])
    encoded = encode_for_generation(processor, prompts)
    unreadable = [dataclasses.replace(p, images=["/nonexistent/image.png"]) for p in prompts]  # never opened
    given = eng.generate(unreadable, 3, sp, seeds=[4, 5], encoded=encoded)
    assert _ids(own) == _ids(given)
    assert all(g.prompt is e for g, e in zip(given, encoded))
    with pytest.raises(ValueError, match="encoded"):
        eng.generate(prompts, 3, sp, encoded=encoded[:1])


def test_max_seconds_ends_the_decode_loop(tiny, prompts):
    model, processor = tiny
    eng = HFEngine(model, processor)
    sp = SamplingParams(max_new_tokens=8, temperature=1.0)
    unbounded = eng.generate(prompts, 2, sp, seeds=[1, 2])
    assert _ids(eng.generate(prompts, 2, sp, seeds=[1, 2], max_seconds=600.0)) == _ids(unbounded)
    bounded = eng.generate(prompts, 2, sp, seeds=[1, 2], max_seconds=0.0)  # out of time at the first check
    for g, u in zip(bounded, unbounded):
        for c, full in zip(g.completions, u.completions):
            assert c.token_ids.tolist() == full.token_ids.tolist()[:1]
            assert c.logprobs.shape == (1,)
            stopped = int(c.token_ids[0]) in eng.stop_ids
            assert c.truncated is not stopped and c.finish_reason == ("stop" if stopped else "length")


def test_fixed_weights_load_once_and_at_sync(tiny_model_dir, prompts, monkeypatch):
    model, processor = load_model_and_processor(tiny_model_dir)
    model.eval()
    eng = HFEngine(model, processor, reload_weights=False)
    sp = SamplingParams(max_new_tokens=6)
    loads = []
    real_load = LeanStep.load_

    def counted_load(self, m):
        loads.append(1)
        real_load(self, m)

    monkeypatch.setattr(LeanStep, "load_", counted_load)
    first = eng.generate(prompts, 2, sp, seeds=[0, 1])  # builds the step (one load)
    assert _ids(eng.generate(prompts, 2, sp, seeds=[0, 1])) == _ids(first) and len(loads) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    eng.sync_weights(model)
    after = eng.generate(prompts, 2, sp, seeds=[0, 1])
    assert len(loads) == 2
    fresh = HFEngine(model, processor, lean_step=False).generate(prompts, 2, sp, seeds=[0, 1])
    assert _ids(after) == _ids(fresh) != _ids(first)
