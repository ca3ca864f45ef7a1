"""The `vllm` rollout engine against real vLLM workers (the vLLM environment; `make test-vllm`), on the random tiny
Qwen2-VL: its sampling log-probs equal the trainer's teacher-forced ones (also at a temperature other than 1),
weights pushed after an optimizer step make vLLM's greedy completions the `hf` engine's (colocated and server
mode), a worker that encodes prompts differently is refused with both sequences, an absent or dead worker is an
error that says so, seeds make sampling reproducible, `max_seconds` and `should_stop` end a long request early
with the completions as far as they got (and the worker serves the next one as usual), and raw prompts (text and
images in memory) sample what their samples do.

Each worker takes tens of seconds to start, so the workers are module fixtures shared by the tests."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from vlrl.data.loading import load_samples
from vlrl.data.synth import write_split
from vlrl.models.build import init_model
from vlrl.models.inputs import (
    collate,
    encode_for_generation,
    encode_sft,
    prompt_text,
    sample_images,
    sft_response,
)
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams, make_engine
from vlrl.rollout.types import RawPrompt
from vlrl.rollout.vllm_engine import PromptMismatchError, VLLMConfig, VLLMEngine, VLLMEngineError
from vlrl.train.logprobs import rows_logprobs_nograd

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def vllm_samples(synth_dir):
    """16 prompts with an image each (the counting task's test split)."""
    samples = load_samples([str(synth_dir / "counting" / "test.jsonl")])
    assert len(samples) >= 16
    return samples[:16]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, processor = load_model_and_processor(tiny_model_dir)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def engine(tiny, vllm_python):
    """One colocated engine (worker started by the engine) on the tiny model's initial weights."""
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(python=vllm_python))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(start_worker, tiny_model_dir):
    """A worker started by hand on the tiny model's folder (server mode)."""
    worker = start_worker(tiny_model_dir)
    yield worker
    worker.stop()


def _greedy(eng, samples) -> list[list[int]]:
    return [g.completions[0].token_ids.tolist() for g in eng.generate(samples, 1, GREEDY)]


def _stepped(model_dir: Path, samples) -> tuple:
    """A fresh copy of the model in `model_dir` after one AdamW step (lr 1e-2, SFT loss on 4 prompts' answers),
    and the `hf` engine's greedy completions of `samples` under it."""
    model, processor = load_model_and_processor(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    items = [encode_sft(processor, s.messages, sample_images(s), sft_response(s)) for s in samples[:4]]
    model(**collate(items, processor.tokenizer.pad_token_id, image_token_id(processor))).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    return model, _greedy(make_engine("hf", model, processor), samples)


@pytest.fixture(scope="module")
def stepped(tiny_model_dir, vllm_samples):
    return _stepped(tiny_model_dir, vllm_samples)


def _check_sync(eng, model, stepped, samples) -> None:
    """vLLM's greedy completions before the step, the step pushed, then equal to `hf`'s under the stepped weights
    and different from before (so the push is what made them equal); `model`'s weights pushed back after."""
    new_model, hf_after = stepped
    before = _greedy(eng, samples)
    eng.sync_weights(new_model)
    try:
        after = _greedy(eng, samples)
    finally:
        eng.sync_weights(model)
    assert after == hf_after
    assert after != before
    assert _greedy(eng, samples) == before  # pushing the old weights back restores the old completions


def _prompts_x_seeds(samples):
    return samples[:4], [11, 12, 13, 14]


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_logprobs_match_teacher_forced(engine, tiny, vllm_samples, temperature):
    model, processor = tiny
    prompts, seeds = _prompts_x_seeds(vllm_samples)
    groups = engine.generate(prompts, 8, SamplingParams(max_new_tokens=16, temperature=temperature), seeds=seeds)
    rows = [(g, j) for g, grp in enumerate(groups) for j in range(grp.size)]
    assert len(rows) == 32
    tok = processor.tokenizer
    ours = rows_logprobs_nograd(model, groups, rows, micro_batch_size=8, temperature=temperature,
                                suppress_ids=vision_token_ids(tok), device=torch.device("cpu"),
                                pad_id=tok.pad_token_id, image_id=image_token_id(processor))
    theirs = [groups[g].completions[j].logprobs for g, j in rows]
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    diff = (torch.cat(ours) - torch.cat(theirs)).abs()  # [sum of T]
    assert diff.numel() >= 32
    assert diff.mean().item() <= 1e-3
    assert diff.max().item() <= 1e-2


def test_same_seeds_same_completions_other_seeds_differ(engine, vllm_samples):
    prompts, seeds = _prompts_x_seeds(vllm_samples)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0)

    def ids(s):
        return [[c.token_ids.tolist() for c in g.completions] for g in engine.generate(prompts, 4, sampling, seeds=s)]

    first = ids(seeds)
    assert ids(seeds) == first
    other = ids([s + 100 for s in seeds])
    assert all(a != b for a, b in zip(other, first))  # every prompt's group changes with its seed


def test_sync_weights_colocated(engine, tiny, stepped, vllm_samples):
    _check_sync(engine, tiny[0], stepped, vllm_samples)


def test_sync_weights_repacks_the_tied_output_head(tmp_path, vllm_python):
    """The same on the built-in small model, whose tied output head vLLM's CPU build computes from a packed copy
    of the embedding that a reload does not renew by itself. Whether the stale head changes greedy completions
    depends on the model's dimensions and the prompts: the tiny model does not show it, these prompts do."""
    path = write_split("counting", 16, seed=3, out_dir=tmp_path / "data", split="test")
    vllm_samples = load_samples([str(path)])[:16]
    model_dir = init_model("qwen2-vl", "small", tmp_path / "small", seed=0)
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    assert model.config.get_text_config().tie_word_embeddings
    eng = VLLMEngine(model, processor, config=VLLMConfig(python=vllm_python))
    try:
        _check_sync(eng, model, _stepped(model_dir, vllm_samples), vllm_samples)
    finally:
        eng.close()
    assert eng.worker is not None and eng.worker.proc.returncode == 0  # it exited by itself when stdin closed


def test_sync_weights_server(server, tiny, stepped, vllm_samples):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(url=server.url))  # pushes the initial weights
    _check_sync(eng, model, stepped, vllm_samples)
    eng.close()
    assert server.proc.poll() is None  # closing a server-mode engine leaves the server running


def test_prompt_mismatch_names_both_sequences(tmp_path, start_worker, tiny_model_dir, tiny, vllm_samples):
    """A worker whose processor makes fewer vision tokens of each image than vlrl's (smaller max pixels). A
    different chat template in the worker's folder would not do: the engine sends the prompt text rendered by
    its own processor."""
    model, processor = tiny
    other = tmp_path / "smaller-images"
    shutil.copytree(tiny_model_dir, other)
    cfg_path = other / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["size"]["longest_edge"] = cfg["size"]["longest_edge"] // 4
    cfg_path.write_text(json.dumps(cfg))
    _, other_processor = load_model_and_processor(other)
    sample = vllm_samples[0]
    ours = encode_for_generation(processor, [sample])[0].input_ids.tolist()
    theirs = encode_for_generation(other_processor, [sample])[0].input_ids.tolist()
    image_id = image_token_id(processor)
    assert ours.count(image_id) > theirs.count(image_id) > 0
    worker = start_worker(other)
    try:
        eng = VLLMEngine(model, processor, config=VLLMConfig(url=worker.url))
        with pytest.raises(PromptMismatchError) as err:
            eng.generate([sample], 1, GREEDY)
    finally:
        worker.stop()
    msg = str(err.value)
    assert f"vlrl: {ours}" in msg and f"vLLM: {theirs}" in msg
    assert f"{ours.count(image_id)} image tokens" in msg and f"{theirs.count(image_id)} image tokens" in msg


def test_no_server_at_url(tiny):
    model, processor = tiny
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = VLLMConfig(url=f"http://127.0.0.1:{port}", startup_timeout=2.0, request_timeout=2.0, retries=0)
    with pytest.raises(VLLMEngineError, match="no vLLM worker answers"):
        VLLMEngine(model, processor, config=cfg)


def test_killed_worker_is_an_error_with_its_log(tiny, vllm_python, vllm_samples):
    model, processor = tiny
    eng = VLLMEngine(model, processor, config=VLLMConfig(python=vllm_python))
    try:
        assert eng.worker is not None
        assert len(_greedy(eng, vllm_samples[:1])) == 1
        eng.worker.proc.kill()
        eng.worker.proc.wait()
        tail = eng.worker.tail()
        assert tail.strip()
        with pytest.raises(VLLMEngineError, match="worker died") as err:
            eng.generate(vllm_samples[:1], 1, GREEDY)
        assert tail in str(err.value)
    finally:
        eng.close()
    assert not Path(eng.worker.dir).exists()  # close removed the temporary model folder


LONG = SamplingParams(max_new_tokens=2000, temperature=0.0)  # the random tiny model's greedy answers never stop


def _check_cut(groups, engine, samples) -> None:
    """Every completion of `groups` (greedy, `LONG`) ended early, without a stop token, and is what a request of
    exactly its length samples (tokens and log-probs): the worker returned the tokens it had."""
    lengths = [c.length for g in groups for c in g.completions]
    assert all(c.truncated and c.finish_reason == "length" for g in groups for c in g.completions)
    assert all(1 <= n < LONG.max_new_tokens for n in lengths), lengths
    short = min(lengths)
    again = engine.generate(samples, 1, SamplingParams(max_new_tokens=short, temperature=0.0))
    for g, h in zip(groups, again):
        assert g.completions[0].token_ids[:short].tolist() == h.completions[0].token_ids.tolist()
        assert torch.allclose(g.completions[0].logprobs[:short], h.completions[0].logprobs, atol=1e-5)


def test_max_seconds_ends_the_completions_where_they_are(engine, vllm_samples):
    samples = vllm_samples[:2]
    groups = engine.generate(samples, 1, LONG, max_seconds=0.5)
    _check_cut(groups, engine, samples)


def test_should_stop_aborts_and_the_worker_serves_the_next_request(engine, vllm_samples):
    samples = vllm_samples[:2]
    before = _greedy(engine, samples)
    start = time.monotonic()
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(time.monotonic() > start + 1.0)
        return asked[-1]

    groups = engine.generate(samples, 1, LONG, should_stop=should_stop)
    assert asked[-1] and asked.count(True) == 1  # polled until True, then the request was aborted
    _check_cut(groups, engine, samples)
    assert _greedy(engine, samples) == before


def test_raw_prompts_sample_what_their_samples_do(engine, tiny, vllm_samples):
    _, processor = tiny
    prompts, seeds = _prompts_x_seeds(vllm_samples)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0)
    # the samples with their image files gone: only the raw prompts and the encodings can feed the request
    bare = [dataclasses.replace(s, images=["/nonexistent.png"] * len(s.images)) for s in prompts]
    raw = [RawPrompt(prompt_text(processor, s.messages), sample_images(s)) for s in prompts]
    encoded = encode_for_generation(processor, prompts)
    ids = [[c.token_ids.tolist() for c in g.completions] for g in engine.generate(prompts, 4, sampling, seeds=seeds)]
    got = engine.generate(bare, 4, sampling, seeds=seeds, encoded=encoded, raw=raw)
    assert [[c.token_ids.tolist() for c in g.completions] for g in got] == ids
    assert [g.sample for g in got] == bare
