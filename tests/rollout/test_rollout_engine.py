"""The `hf` rollout engine on the random tiny model: groups of G, truncation, sampling log-probs against an
independent teacher-forced recomputation, vision tokens never sampled, per-prompt seeds that make sampling
batch-invariant."""

from __future__ import annotations

import pytest
import torch

from vlrl.data.loading import load_samples
from vlrl.models.inputs import collate
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams, make_engine, mix_seed
from vlrl.rollout.hf_engine import HFEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(synth_dir):
    return load_samples([str(synth_dir / "counting" / "train.jsonl")])[:3]


def _bias_logits(model, bias: dict[int, float]):
    """Add `bias` to the given vocabulary logits of every forward (a hook on the LM head)."""
    vec = torch.zeros(model.config.get_text_config().vocab_size)
    for i, b in bias.items():
        vec[i] = b
    return model.lm_head.register_forward_hook(lambda _m, _i, out: out + vec)


def test_groups_of_g_with_truncation_flags(tiny, prompts):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    stop = eng.stop_ids  # type: ignore[attr-defined]
    handle = _bias_logits(model, {processor.tokenizer.eos_token_id: 6.0})  # ~20% EOS per token
    try:
        groups = eng.generate(prompts, 5, SamplingParams(max_new_tokens=8), seeds=[1, 2, 3])
    finally:
        handle.remove()
    assert [g.sample.id for g in groups] == [p.id for p in prompts]
    assert all(g.size == 5 for g in groups)
    flags = []
    for g in groups:
        assert g.prompt.input_ids.dim() == 1 and g.prompt.pixel_values is not None  # encoded once per group
        for c in g.completions:
            ids = c.token_ids.tolist()
            stops = [k for k, t in enumerate(ids) if t in stop]
            if c.truncated:
                assert c.length == 8 and not stops
            else:
                assert stops == [c.length - 1]  # ends at its first stop token
            assert c.logprobs.shape == c.token_ids.shape and bool((c.logprobs <= 0).all())
            flags.append(c.truncated)
    assert any(flags) and not all(flags)  # both kinds occur with these seeds


def _teacher_forced(model, processor, group, completion, suppress: list[int]) -> torch.Tensor:
    """Log-probs of the completion tokens from one full forward of prompt + completion (no cache, no slicing)."""
    enc = group.prompt
    ids = torch.cat([enc.input_ids, completion.token_ids])
    item = type(enc)(input_ids=ids, labels=None, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
    batch = collate([item], processor.tokenizer.pad_token_id, image_token_id(processor))
    with torch.no_grad():
        logits = model(**batch).logits[0].float()  # [L + T, V]
    logits[:, suppress] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    n = len(enc.input_ids)
    return logp[n - 1 : n - 1 + completion.length].gather(1, completion.token_ids[:, None]).squeeze(1)


def test_sampling_logprobs_equal_teacher_forcing(tiny, prompts):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    suppress = vision_token_ids(processor.tokenizer)
    groups = eng.generate(prompts[:2], 3, SamplingParams(max_new_tokens=6, temperature=1.0), seeds=[5, 6])
    for g in groups:
        for c in g.completions:
            ref = _teacher_forced(model, processor, g, c, suppress)
            assert torch.allclose(c.logprobs, ref, atol=1e-4), (c.logprobs, ref)


def test_logprobs_are_of_the_processed_distribution(tiny, prompts):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    groups = eng.generate(prompts[:1], 2, SamplingParams(max_new_tokens=4, top_k=1), seeds=[0])
    for c in groups[0].completions:  # top-1 keeps one token: probability 1
        assert torch.allclose(c.logprobs, torch.zeros_like(c.logprobs))
    greedy = eng.generate(prompts[:1], 1, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert torch.equal(greedy[0].completions[0].token_ids[:4], groups[0].completions[0].token_ids[:4])


def test_vision_tokens_never_sampled(tiny, prompts):
    model, processor = tiny
    vision = vision_token_ids(processor.tokenizer)
    handle = _bias_logits(model, {i: 30.0 for i in vision})  # unsuppressed, they would win every draw
    try:
        groups = make_engine("hf", model, processor).generate(prompts, 4, SamplingParams(max_new_tokens=6))
    finally:
        handle.remove()
    sampled = torch.cat([c.token_ids for g in groups for c in g.completions])
    assert not torch.isin(sampled, torch.tensor(vision)).any()


def test_seeded_sampling_is_batch_invariant(tiny, prompts):
    model, processor = tiny
    eng = HFEngine(model, processor)
    sp = SamplingParams(max_new_tokens=6, temperature=1.3)
    seeds = [mix_seed(0, i) for i in range(3)]
    together = eng.generate(prompts, 4, sp, seeds=seeds)
    alone = eng.generate(prompts[2:], 4, sp, seeds=seeds[2:])
    chunked = HFEngine(model, processor, max_prompts_per_call=1).generate(prompts, 4, sp, seeds=seeds)
    threads = torch.get_num_threads()
    sharded = HFEngine(model, processor, decode_threads=2).generate(prompts, 4, sp, seeds=seeds)  # 2 Python threads
    assert torch.get_num_threads() == threads and torch.is_grad_enabled()  # restored; the caller's grad mode kept
    assert not sharded[0].completions[0].logprobs.requires_grad  # the worker threads ran without autograd
    for a, b in ((together[2], alone[0]), *zip(together, chunked), *zip(together, sharded)):
        for x, y in zip(a.completions, b.completions):
            assert torch.equal(x.token_ids, y.token_ids)
            assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5)
    other = eng.generate(prompts[2:], 4, sp, seeds=[mix_seed(1, 2)])
    assert any(not torch.equal(x.token_ids, y.token_ids) for x, y in zip(alone[0].completions, other[0].completions))
    texts = [c.text for c in together[0].completions]
    assert len(set(texts)) > 1  # the G completions of one prompt differ


@pytest.mark.parametrize("threads", [1, 2])
def test_on_tokens_reports_every_row_token_by_token(tiny, prompts, threads):
    """`on_tokens` hears each completion's tokens one decode step at a time, as rows i * n + j (also when the
    prompts are decoded in shards by several threads), up to and with the stop token, nothing after."""
    model, processor = tiny
    eng = HFEngine(model, processor, decode_threads=threads, max_prompts_per_call=1 if threads == 2 else 0)
    sp = SamplingParams(max_new_tokens=6, temperature=1.3)
    heard: dict[int, list[list[int]]] = {}
    groups = eng.generate(prompts, 3, sp, seeds=[1, 2, 3],
                          on_tokens=lambda row, ids: heard.setdefault(row, []).append(ids))
    rows = [c.token_ids.tolist() for g in groups for c in g.completions]
    assert sorted(heard) == list(range(len(rows)))
    assert [sum(heard[r], []) for r in range(len(rows))] == rows
    assert all(len(piece) == 1 for pieces in heard.values() for piece in pieces)


def test_unseeded_sampling_follows_the_torch_rng(tiny, prompts):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    sp = SamplingParams(max_new_tokens=5)
    torch.manual_seed(123)
    a = eng.generate(prompts[:1], 3, sp)
    torch.manual_seed(123)
    b = eng.generate(prompts[:1], 3, sp)
    assert [c.token_ids.tolist() for c in a[0].completions] == [c.token_ids.tolist() for c in b[0].completions]


def test_sync_weights_is_a_noop_and_engine_errors(tiny):
    model, processor = tiny
    eng = make_engine("hf", model, processor)
    before = [p.detach().clone() for p in model.parameters()][:3]
    eng.sync_weights(model)
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.parameters())[:3]))
    with pytest.raises(ValueError, match="valid: hf, vllm"):
        make_engine("sglang", model, processor)


def test_vllm_without_its_environment_says_how_to_build_it(tiny, tmp_path):
    from vlrl.rollout.vllm_engine import VLLMConfig, VLLMEngineError

    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(VLLMEngineError, match=r"no vLLM environment at .*no-venv.*make vllm-env"):
        make_engine("vllm", *tiny, config=VLLMConfig(python=str(missing)))


def test_bad_arguments(tiny, prompts):
    eng = make_engine("hf", *tiny)
    with pytest.raises(ValueError, match="seeds"):
        eng.generate(prompts, 2, SamplingParams(), seeds=[1])
    with pytest.raises(ValueError, match="n"):
        eng.generate(prompts, 0, SamplingParams())
    assert eng.generate([], 2, SamplingParams()) == []
