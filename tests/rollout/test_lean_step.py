"""`LeanStep`, the hf engine's decode step on re-laid-out weights: the same completions and sampling log-probs as
the model's own forward for every supported architecture (left-padded prompts of different lengths, rows
stopping at different steps), and a fall-back to the model's forward when a hook or an adapter is present."""

from __future__ import annotations

import pytest
import torch

from vlrl.data.loading import load_samples
from vlrl.models.build import init_model
from vlrl.models.cache_name import cache_arg
from vlrl.models.loading import load_model_and_processor
from vlrl.rollout import SamplingParams
from vlrl.rollout.hf_engine import HFEngine
from vlrl.rollout.lean_step import LeanStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixed_prompts(synth_dir):
    """Prompts of different token lengths (left padding in the batch): counting, chart and compare items."""
    out = []
    for task in ("counting", "chart", "compare"):
        out += load_samples([str(synth_dir / task / "train.jsonl")])[:2]
    return out


def _completions(engine: HFEngine, prompts, n: int, sampling: SamplingParams):
    groups = engine.generate(prompts, n, sampling, seeds=list(range(len(prompts))))
    return [c for g in groups for c in g.completions]


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_lean_decode_equals_the_models_forward(arch, tmp_path, mixed_prompts):
    model, processor = load_model_and_processor(init_model(arch, "tiny", tmp_path / arch, seed=0))
    model.eval()
    assert LeanStep.supports(model)
    lean, plain = HFEngine(model, processor, lean_step=True), HFEngine(model, processor, lean_step=False)
    # A third of the vocabulary stops a row: rows end at different steps and drop out of the batch mid-decode.
    stops = list(range(0, model.config.get_text_config().vocab_size, 3))
    lean.stop_ids = plain.stop_ids = stops
    sampling = SamplingParams(max_new_tokens=10, temperature=1.2)
    a, b = _completions(lean, mixed_prompts, 4, sampling), _completions(plain, mixed_prompts, 4, sampling)
    assert len({c.length for c in a}) > 2  # rows did stop at different steps
    for x, y in zip(a, b):
        assert torch.equal(x.token_ids, y.token_ids)
        assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5), (x.logprobs, y.logprobs)


def test_lean_step_logits_equal_the_models_forward(tiny_model_dir, mixed_prompts):
    """One decode step, directly: LeanStep's logits vs the model's forward on the same prompt cache."""
    from vlrl.models.inputs import encode_for_generation
    from vlrl.rollout.prefix import continuation_mask, expand_cache, prefill, prompt_inputs, text_positions

    model, processor = load_model_and_processor(tiny_model_dir)
    model.eval()
    engine = HFEngine(model, processor)
    inputs = prompt_inputs(encode_for_generation(processor, mixed_prompts), engine.pad_id, engine.image_id)
    rows = torch.arange(len(mixed_prompts))
    tokens = torch.tensor([17, 30, 41, 55, 68, 72])
    with torch.no_grad():
        _, cache, next_pos = prefill(model, inputs)
        length = inputs["input_ids"].shape[1]
        mask = continuation_mask(inputs["attention_mask"], torch.ones(len(rows), 1, dtype=torch.long))  # [b, L + 1]
        c1, c2 = expand_cache(cache, rows, length + 1), expand_cache(cache, rows, length + 1)
        want = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=text_positions(next_pos, 0, 1),
                     **cache_arg(c1), use_cache=True).logits[:, -1]
        bias = torch.zeros(mask.shape).masked_fill_(mask == 0, float("-inf"))
        got = LeanStep(model)(tokens, next_pos, c2, bias)
    assert (inputs["attention_mask"] == 0).any()  # some rows are left-padded
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_lean_step_runs_a_bf16_model_like_its_forward(tiny_model_dir, mixed_prompts):
    """bf16 weights (`dtype: pure_bfloat16`): the rotary factors and the padding bias follow the model's dtype, so
    keys, queries and the KV cache stay bf16, and the completions are the model's own forward's."""
    model, processor = load_model_and_processor(tiny_model_dir, torch.bfloat16)
    model.eval()
    lean, plain = HFEngine(model, processor, lean_step=True), HFEngine(model, processor, lean_step=False)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    a, b = _completions(lean, mixed_prompts, 2, sampling), _completions(plain, mixed_prompts, 2, sampling)
    same = sum(torch.equal(x.token_ids, y.token_ids) for x, y in zip(a, b))
    assert same >= len(a) - 2  # bf16 rounding may flip a near-tied draw, not the decode
    for x, y in zip(a, b):
        if torch.equal(x.token_ids, y.token_ids):
            assert torch.allclose(x.logprobs, y.logprobs, atol=0.1)


def test_hooks_and_adapters_fall_back_to_the_models_forward(tiny_model_dir, mixed_prompts):
    model, processor = load_model_and_processor(tiny_model_dir)
    assert LeanStep.supports(model)
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out)
    assert not LeanStep.supports(model)
    handle.remove()

    class Adapter(torch.nn.Linear):  # stands in for a LoRA layer: not a plain nn.Linear
        pass

    text = model.model.language_model
    q = text.layers[0].self_attn.q_proj
    adapted = Adapter(q.in_features, q.out_features, bias=True)
    adapted.load_state_dict(q.state_dict())
    text.layers[0].self_attn.q_proj = adapted
    assert not LeanStep.supports(model)
    with pytest.raises(TypeError, match="does not support"):
        LeanStep(model)


def test_reloaded_buffers_equal_a_fresh_build(tiny_model_dir, mixed_prompts):
    """The engine keeps one LeanStep and reloads it: after the weights change, `load_` gives the same step as
    a fresh build, and the engine's completions follow the new weights."""
    model, processor = load_model_and_processor(tiny_model_dir)
    model.eval()
    engine = HFEngine(model, processor)
    sampling = SamplingParams(max_new_tokens=6)
    engine.generate(mixed_prompts[:2], 2, sampling, seeds=[0, 1])
    kept = engine._step
    assert kept is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = _completions(engine, mixed_prompts[:2], 2, sampling)
    assert engine._step is kept  # same buffers, reloaded
    fresh = _completions(HFEngine(model, processor, lean_step=False), mixed_prompts[:2], 2, sampling)
    for x, y in zip(after, fresh):
        assert torch.equal(x.token_ids, y.token_ids) and torch.allclose(x.logprobs, y.logprobs, atol=1e-5)
    rebuilt = LeanStep(model)
    for a, b in zip(kept._plan(model), rebuilt._plan(model)):
        assert torch.equal(a[0], b[0])
