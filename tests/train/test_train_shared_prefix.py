"""The shared-prefix forward (each prompt once per group, its KV cache expanded to the group's rows) against the
plain [prompt | completion] forward: the same positions, log-probs and gradients (fp32, within 1e-5), for
prompts of different lengths (left padding), with and without an image, micro-batches that split groups, and
completions of different lengths (one of a single token). On both model families: Qwen2-VL (M-RoPE from its rope
index) and InternVL (1-D positions, one vision output per tile); with activation checkpointing too (the prompt
pass once, the completions replayed against the prefix cache), where the update is the plain path's."""

from __future__ import annotations

import copy

import pytest
import torch
from random_groups import random_groups

from vlrl.algos import POLICY_LOSSES
from vlrl.data.loading import load_samples
from vlrl.models.build import init_model
from vlrl.models.families import QWEN_VL, family_of_model
from vlrl.models.inputs import collate, encode_for_generation, encode_prompt
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.prefix import cache_layers, prompt_inputs, prompt_positions, text_positions
from vlrl.train.dist import DistInfo
from vlrl.train.logprobs import build_rows, length_order, row_logprobs, rows_logprobs_nograd
from vlrl.train.rl_update import LossSpec, UpdateBatch, policy_update

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LENGTHS = [[5, 1, 3], [2, 6, 6], [4, 4, 1]]  # completion lengths per group


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["qwen2-vl", "internvl"])
def setup(request, synth_dir, tmp_path_factory):
    if request.param == "qwen2-vl":
        folder = request.getfixturevalue("tiny_model_dir")
    else:
        folder = init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)
    model, processor = load_model_and_processor(folder)
    model.train()
    samples = [load_samples([str(synth_dir / task / "train.jsonl")])[0] for task in ("counting", "chart")]
    encoded = encode_for_generation(processor, samples)
    text_only = encode_prompt(processor, [{"role": "user", "content": "How many are there? Think step by step."}], [])
    encoded.append(text_only)  # no image: 1-D positions
    assert len({len(e.input_ids) for e in encoded}) == 3  # three prompt lengths: left padding matters
    return model, processor, random_groups(processor, samples, encoded, LENGTHS)


def _kw(processor):
    return dict(temperature=1.3, suppress_ids=vision_token_ids(processor.tokenizer), device=torch.device("cpu"))


def test_positions_continue_the_rope_index_of_the_whole_sequence(setup):
    model, processor, groups = setup
    if family_of_model(model) is not QWEN_VL:
        _assert_positions_count_each_rows_tokens(model, processor, groups)
        return
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    image_groups = groups[:2]  # get_rope_index needs every row to be a vision + text sequence
    inputs = prompt_inputs([g.prompt for g in image_groups], pad, img)
    pos, next_pos = prompt_positions(model, inputs)
    n = 5
    full = [type(g.prompt)(torch.cat([g.prompt.input_ids, torch.full((n,), 100)]), None, g.prompt.pixel_values,
                           g.prompt.image_grid_thw) for g in image_groups]
    batch = collate(full, pad, img, padding_side="left")
    ref, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    lp = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].bool()
    assert torch.equal(pos[:, real], ref[:, :, :lp][:, real])
    assert torch.equal(text_positions(next_pos, 0, n), ref[:, :, lp:])


def _assert_positions_count_each_rows_tokens(model, processor, groups, n: int = 5):
    """InternVL: 1-D positions; an unpadded [prompt | text] row is at positions 0 .. L + n - 1 (the model's own
    when it is given none), whatever the left padding of the batched prompts."""
    family = family_of_model(model)
    inputs = prompt_inputs([g.prompt for g in groups], processor.tokenizer.pad_token_id, image_token_id(processor))
    pos, next_pos = prompt_positions(model, inputs)
    real = inputs["attention_mask"].bool()
    lengths = [len(g.prompt.input_ids) for g in groups]
    assert pos.shape == real.shape and len(set(lengths)) == len(groups)  # left padding on all rows but one
    for r, length in enumerate(lengths):
        assert torch.equal(pos[r][real[r]], torch.arange(length))
        assert torch.equal(text_positions(next_pos, 0, n, family)[r], torch.arange(length, length + n))


@pytest.mark.parametrize("rows", [
    [(g, j) for g in range(3) for j in range(3)],  # whole groups
    [(0, 1), (1, 0), (2, 2), (0, 2), (1, 2)],  # groups split and interleaved
    [(0, 1), (2, 2)],  # every completion a single token
])
def test_shared_prefix_logprobs_and_gradients_equal_the_plain_forward(setup, rows):
    model, processor, groups = setup
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    results = []
    for shared in (True, False):
        m = copy.deepcopy(model)
        batch = build_rows(groups, rows, pad, img, share_vision=False, shared_prefix=shared)
        out = row_logprobs(m, groups, batch, with_entropy=True, **_kw(processor))
        weights = torch.linspace(-1.0, 1.0, out.logp.numel()).view_as(out.logp)
        (out.logp * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert torch.equal(a.mask, b.mask)
    assert float((a.logp - b.logp).detach().abs().max()) < 1e-5
    assert float(((a.entropy - b.entropy) * a.mask).abs().max()) < 1e-4
    assert ga.keys() == gb.keys() and len(ga) > 0.9 * len(list(model.parameters()))  # the vision tower included
    worst = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    assert worst < 1e-5, worst


def test_nograd_logprobs_and_update_match(setup):
    model, processor, groups = setup
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    rows = [(g, j) for g in range(3) for j in range(3)]
    common = dict(pad_id=pad, image_id=img, **_kw(processor))
    shared = rows_logprobs_nograd(model, groups, rows, micro_batch_size=4, **common)
    plain = rows_logprobs_nograd(model, groups, rows, micro_batch_size=9, shared_prefix=False, **common)
    assert model.training  # restored
    for a, b in zip(shared, plain):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5
    adv = torch.linspace(-1.0, 1.0, 9)
    finals = []
    for shared_prefix in (True, False):
        m = copy.deepcopy(model)
        params = [p for p in m.parameters() if p.requires_grad]
        spec = LossSpec(loss_fn=POLICY_LOSSES.get("ppo_clip"), loss_kwargs={}, agg_mode="seq-mean-token-mean",
                        max_len=6, beta=0.04, kl_estimator="k3", kl_clamp=None, kl_in_loss=True, temperature=1.3,
                        suppress_ids=vision_token_ids(processor.tokenizer), ppo_epochs=1, num_minibatches=1,
                        micro_batch_size=4, max_grad_norm=1e9, pad_id=pad, image_id=img, share_vision=True,
                        shared_prefix=shared_prefix)
        batch = UpdateBatch(groups, [0, 1, 2], 3, adv, torch.ones(9), None, [x - 0.1 for x in plain])
        policy_update(m, params, torch.optim.SGD(params, lr=1.0), batch, spec, 3, ONE)
        finals.append([p.detach() for p in params])
    assert max(float((x - y).abs().max()) for x, y in zip(*finals)) < 1e-5


def test_activation_checkpointing_keeps_the_shared_prefix_and_its_update(setup):
    """With activation checkpointing the shared prefix still runs: the prompt pass once, unreplayed (it writes the
    KV cache), the completion pass replayed in the backward against the read-only prefix cache; the update equals
    the plain layout's without checkpointing (the same parameters after the step)."""
    model, processor, groups = setup
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    finals, calls = [], []
    for checkpointing, shared_prefix in ((True, True), (False, True), (False, False)):
        m = copy.deepcopy(model)
        if checkpointing:
            m.activation_checkpointing_enable()
        first_attention = cache_layers(m)[0].self_attn  # hooks inside a checkpointed layer run again on replay
        count = [0]
        first_attention.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        params = [p for p in m.parameters() if p.requires_grad]
        spec = LossSpec(loss_fn=POLICY_LOSSES.get("ppo_clip"), loss_kwargs={}, agg_mode="token-mean", max_len=6,
                        beta=0.0, kl_estimator="k3", kl_clamp=None, kl_in_loss=False, temperature=1.0,
                        suppress_ids=vision_token_ids(processor.tokenizer), ppo_epochs=1, num_minibatches=1,
                        micro_batch_size=9, max_grad_norm=1e9, pad_id=pad, image_id=img, share_vision=True,
                        shared_prefix=shared_prefix)
        batch = UpdateBatch(groups, [0, 1, 2], 3, torch.linspace(-1.0, 1.0, 9), torch.ones(9), None, None)
        out = policy_update(m, params, torch.optim.SGD(params, lr=1.0), batch, spec, 3, ONE)
        assert out["updates"] == 1.0 and out["grad_norm"] > 0
        finals.append([p.detach() for p in params])
        calls.append(count[0])
    # one micro-batch: prompt + completions (+ the completions' replay), against the plain layout's one pass
    assert calls == [3, 2, 1]
    for other in finals[1:]:
        assert max(float((x - y).abs().max()) for x, y in zip(finals[0], other)) < 1e-5
    moved = max(float((x - y.detach()).abs().max()) for x, y in zip(finals[0], model.parameters()))
    assert moved > 1e-3


def test_length_order_keeps_groups_together_shortest_first(setup):
    _, _, groups = setup
    rows = [(g, j) for g in range(3) for j in range(3)]
    order = length_order(groups, rows)
    assert sorted(order) == list(range(9))
    seq = [rows[i] for i in order]
    assert [g for g, _ in seq] == [2, 2, 2, 0, 0, 0, 1, 1, 1]  # longest completions 4, 5, 6
    assert [groups[g].completions[j].length for g, j in seq] == [1, 4, 4, 1, 3, 5, 2, 6, 6]
