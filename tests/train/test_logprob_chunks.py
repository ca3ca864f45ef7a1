"""The LM head in chunks (`vlrl.train.logprobs.chunked_logprobs`): the same log-probs, entropies and gradients as
the full [b, T, V] logits, and no chunk larger than asked for in a real forward of the tiny model."""

from __future__ import annotations

import pytest
import torch

from vlrl.algos import entropy_from_logits
from vlrl.data.loading import load_samples
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams, make_engine
from vlrl.train.logprobs import CompletionStates, build_rows, chunked_logprobs, row_logprobs, token_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T, H, V = 3, 5, 8, 11
SUPPRESS = [2, 7]


def _full(head, hidden, first, ids, mask, temperature):
    """The unchunked reference: every position's logits at once."""
    logits = head(hidden)  # [b, T', V]
    if first is not None:
        logits = torch.cat([first[:, None], logits], dim=1)  # [b, T, V]
    logp, scaled = token_logprobs(logits, ids, temperature, SUPPRESS)
    return logp * mask, entropy_from_logits(scaled.detach()) * mask


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
@pytest.mark.parametrize("with_first", [False, True])
def test_chunks_equal_the_full_logits_values_and_gradients(chunk, with_first):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    ids = torch.randint(0, V, (B, T))
    ids[ids == 2] = 3  # suppressed tokens are never sampled
    ids[ids == 7] = 4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    t_hidden = T - 1 if with_first else T
    hidden = torch.randn(B, t_hidden, H, requires_grad=True)
    first = torch.randn(B, V, requires_grad=True) if with_first else None
    want_lp, want_ent = _full(head, hidden, first, ids, mask, 0.7)
    (want_lp * torch.arange(1.0, T + 1)).sum().backward()
    want_grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([first.grad.clone()] if with_first else [])
    hidden.grad, head.weight.grad = None, None
    if first is not None:
        first.grad = None

    calls: list[int] = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    got_lp, got_ent = chunked_logprobs(head, CompletionStates(hidden, first), ids, mask, temperature=0.7,
                                       suppress_ids=SUPPRESS, chunk_tokens=chunk, with_entropy=True)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_ent, want_ent, rtol=1e-6, atol=1e-6)
    (got_lp * torch.arange(1.0, T + 1)).sum().backward()
    got_grads = [hidden.grad, head.weight.grad] + ([first.grad] if with_first else [])
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    real = int(mask[:, 1:].sum()) if with_first else int(mask.sum())  # padding never reaches the head
    assert max(calls) <= chunk and sum(calls) == 2 * real  # each chunk again in the backward (recomputed)


def test_without_grad_each_chunk_runs_once():
    torch.manual_seed(1)
    head = torch.nn.Linear(H, V, bias=False)
    ids, mask = torch.randint(0, V, (B, T)), torch.ones(B, T)
    calls: list[int] = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        chunked_logprobs(head, CompletionStates(torch.randn(B, T, H)), ids, mask, temperature=1.0, suppress_ids=[],
                         chunk_tokens=4)
    assert calls == [4, 4, 4, 3]


@pytest.mark.slow
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_tiny_model_rows_in_small_chunks(tiny_model_dir, synth_dir, shared_prefix):
    """A real forward: chunks of 3 tokens give the one-chunk log-probs and gradients, and the head never sees
    more than 3 positions."""
    model, processor = load_model_and_processor(tiny_model_dir)
    prompts = load_samples([str(synth_dir / "counting" / "train.jsonl")])[:2]
    groups = make_engine("hf", model, processor).generate(prompts, 3, SamplingParams(max_new_tokens=6, temperature=1.3),
                                                         seeds=[5, 6])
    rows = [(g, j) for g in range(2) for j in range(3)]
    batch = build_rows(groups, rows, processor.tokenizer.pad_token_id, image_token_id(processor),
                       shared_prefix=shared_prefix)
    kw = dict(temperature=1.3, suppress_ids=vision_token_ids(processor.tokenizer), device=torch.device("cpu"),
              with_entropy=True)
    results = {}
    for chunk in (3, 10**6):
        calls: list[int] = []

        def record(m, i, o, calls=calls):
            calls.append(i[0].shape[-2])

        hook = model.get_output_embeddings().register_forward_hook(record)
        model.zero_grad(set_to_none=True)
        out = row_logprobs(model, groups, batch, chunk_tokens=chunk, **kw)
        out.logp.sum().backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = (out.logp.detach(), out.entropy, grads, calls)
    small, whole = results[3], results[10**6]
    torch.testing.assert_close(small[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small[1], whole[1], rtol=1e-5, atol=1e-5)
    assert small[2].keys() == whole[2].keys() and len(small[2]) > 10
    for name in whole[2]:
        torch.testing.assert_close(small[2][name], whole[2][name], rtol=1e-4, atol=2e-5)  # summation order
    chunk_calls = small[3][1:] if shared_prefix else small[3]  # the prefill's own head call: one position per prompt
    assert chunk_calls and max(chunk_calls) <= 3 and len(chunk_calls) > len(whole[3])
