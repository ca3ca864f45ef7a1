"""`ServedModel`, the server's generation, in process on the tiny model: it decodes through the `hf` rollout
engine and gives the greedy completions transformers' `generate` gave the server before (same encoding, vision
tokens suppressed, `<|im_end|>` as end of sequence), with seeds, n, stop strings, usage and the time bound.

The random tiny model's greedy text repeats one token from the first step; its weights are perturbed here (fixed
seed) so the completions vary, and EOS's LM-head row is set to a multiple of a token's row the model emits often,
so that some completions end at EOS ("stop") and others run out ("length")."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from PIL import Image

from vlrl.data.sample import Sample
from vlrl.models.inputs import collate
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout.types import SamplingParams
from vlrl.serve.generate import ContextLengthError, ServedModel, encode_sample, request_text
from vlrl.serve.schemas import LITERAL_IMAGE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Count: 1 2 3", "What is 2 + 2?", "Hello there", "<image>How many shapes?",
         "Which is bigger, <image> or <image>?", "Say <image> literally."]


def _case(text: str, literal_image: bool = False) -> tuple[Sample, list[Image.Image]]:
    """A request as the app hands it over: one image per `<image>` (the last case keeps its "<image>" text)."""
    k = 0 if literal_image else text.count("<image>")
    images = [Image.new("RGB", (56 + 8 * j, 48), (200, 30 * j, 30)) for j in range(k)]
    content = text.replace("<image>", LITERAL_IMAGE) if literal_image else text
    sample = Sample(id="r", images=[f"request-image-{j}" for j in range(k)],
                    messages=[{"role": "user", "content": content}], answer="", problem_type="free_form")
    return sample, images


CASES = [_case(t) for t in TEXTS[:-1]] + [_case(TEXTS[-1], literal_image=True)]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Any) -> ServedModel:
    model, processor = load_model_and_processor(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    served = ServedModel(model, processor, "tiny")
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    emitted = Counter(t for s, ims in CASES for t in _engine_ids(served, s, ims, greedy))
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.2 * model.lm_head.weight[emitted.most_common(1)[0][0]]
    served.engine.sync_weights(model)
    return served


def _engine_ids(served: ServedModel, sample: Sample, images: list[Image.Image], sampling: SamplingParams) -> list[int]:
    enc = encode_sample(served.processor, sample, images)
    group = served.engine.generate([sample], 1, sampling, seeds=[0], encoded=[enc])[0]
    return list(group.completions[0].token_ids.tolist())


def _reference(served: ServedModel, sample: Sample, images: list[Image.Image], max_new: int) -> tuple[str, int, str]:
    """The server's greedy completion before it used the engine: `model.generate` with its settings."""
    model, processor = served.model, served.processor
    tok = processor.tokenizer
    batch = collate([encode_sample(processor, sample, images)], tok.pad_token_id, image_token_id(processor),
                    padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, num_return_sequences=1,
                             suppress_tokens=vision_token_ids(tok), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, do_sample=False, temperature=None, top_p=None,
                             top_k=None)  # [1, L + T]
    row = out[0, batch["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in row:
        n = row.index(tok.eos_token_id) + 1
        return tok.decode(row[:n], skip_special_tokens=True), n, "stop"
    return tok.decode(row, skip_special_tokens=True), len(row), "length"


@pytest.mark.parametrize("lean", [True, False])
def test_greedy_equals_the_former_generate_path(served: ServedModel, lean: bool) -> None:
    served.engine.lean_step = lean  # type: ignore[attr-defined]  # LeanStep (the CPU default) or the model's forward
    try:
        got = [served.generate(s, ims, SamplingParams(max_new_tokens=24, temperature=0.0)) for s, ims in CASES]
    finally:
        served.engine.lean_step = True  # type: ignore[attr-defined]
    want = [_reference(served, s, ims, 24) for s, ims in CASES]
    assert {w[2] for w in want} == {"stop", "length"}  # both endings are compared
    assert len({w[0] for w in want}) == len(CASES)
    for result, (text, tokens, reason) in zip(got, want):
        choice = result.choices[0]
        assert (choice.text, choice.completion_tokens, choice.finish_reason) == (text, tokens, reason)


def test_seeds_n_and_the_global_rng(served: ServedModel) -> None:
    sample, images = CASES[3]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, n=3)
    rng = torch.random.get_rng_state()
    texts = [[c.text for c in served.generate(sample, images, sampling, seed=seed).choices] for seed in (7, 7, 8)]
    unseeded = [[c.text for c in served.generate(sample, images, sampling).choices] for _ in range(2)]
    assert torch.equal(rng, torch.random.get_rng_state())  # requests do not touch the process's RNG
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert len(set(texts[0])) == 3  # the n completions of one request differ
    assert unseeded[0] != unseeded[1]
    greedy = served.generate(sample, images, SamplingParams(max_new_tokens=12, temperature=0.0, n=3))
    assert len(greedy.choices) == 3 and len({(c.text, c.completion_tokens) for c in greedy.choices}) == 1


def test_stop_strings_usage_and_context(served: ServedModel) -> None:
    sample, images = CASES[0]
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    full = served.generate(sample, images, sampling).choices[0]
    stop = full.text[6:9]
    cut = served.generate(sample, images, sampling, stop=["\u2603", stop]).choices[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    tok = served.processor.tokenizer
    assert cut.completion_tokens == len(tok(cut.text, add_special_tokens=False)["input_ids"]) < full.completion_tokens
    result = served.generate(sample, images, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert result.prompt_tokens == len(encode_sample(served.processor, sample, images).input_ids)
    with pytest.raises(ContextLengthError, match="exceed the model's context"):
        served.generate(sample, images, SamplingParams(max_new_tokens=served.context))


@pytest.mark.parametrize(("temperature", "n", "stop"), [(1.0, 3, False), (0.0, 2, False), (0.0, 1, True)])
def test_on_text_streams_each_choice_in_pieces_that_add_up(served: ServedModel, temperature: float, n: int,
                                                          stop: bool) -> None:
    """Streaming: each choice's text arrives in several pieces while the engine decodes, and they add up to the
    choice's final text (sampled n completions; greedy decoded once for n choices; cut at a stop string)."""
    sample, images = CASES[0]
    sampling = SamplingParams(max_new_tokens=24, temperature=temperature, n=n)
    plain = served.generate(sample, images, sampling, seed=3)
    stops = [plain.choices[0].text[6:9]] if stop else []
    if stop:
        plain = served.generate(sample, images, sampling, seed=3, stop=stops)
    pieces: dict[int, list[str]] = {i: [] for i in range(n)}
    streamed = served.generate(sample, images, sampling, seed=3, stop=stops,
                               on_text=lambda i, text: pieces[i].append(text))
    assert [c.text for c in streamed.choices] == [c.text for c in plain.choices]
    assert ["".join(pieces[i]) for i in range(n)] == [c.text for c in plain.choices]
    assert all(len(pieces[i]) > 1 for i in range(n)) and all(all(pieces[i]) for i in range(n))
    if stop:
        assert plain.choices[0].finish_reason == "stop" and stops[0] not in "".join(pieces[0])

def test_max_time_ends_with_length(served: ServedModel) -> None:
    sample, images = CASES[1]
    bounded = ServedModel(served.model, served.processor, "tiny", max_time=0.0)
    result = bounded.generate(sample, images, SamplingParams(max_new_tokens=24, n=2), seed=1)
    for choice in result.choices:  # the deadline has passed at the first check: one token each
        assert choice.completion_tokens == 1 and choice.finish_reason == "length"


def test_should_stop_cancels_between_decode_steps(served: ServedModel) -> None:
    """Finding 5: the server's cancellation (its client is gone) ends the decode loop at the next step."""
    sample, images = CASES[1]
    checks: list[int] = []

    def stop_after_three() -> bool:
        checks.append(1)
        return len(checks) >= 3

    result = served.generate(sample, images, SamplingParams(max_new_tokens=24, temperature=1.0, n=2), seed=1,
                             should_stop=stop_after_three)
    # one check before encoding, one after each token: the third call ends the decode after its second token
    assert len(checks) == 3 and [c.completion_tokens for c in result.choices] == [2, 2]
    from vlrl.serve.generate import Cancelled

    with pytest.raises(Cancelled):  # a request whose client left before its turn is not even encoded
        served.generate(sample, images, SamplingParams(max_new_tokens=24, n=2), seed=1, should_stop=lambda: True)


class _Spy:
    """An engine that records each `generate` call's keyword arguments and hands the call to the real engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts: Any, n: int, sampling: SamplingParams, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.engine.generate(prompts, n, sampling, **kwargs)


def test_the_engine_gets_the_encoding_and_the_same_prompt_as_text_and_images(served: ServedModel,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The vllm engine samples from `raw` (text + images) and checks vLLM's ids against `encoded`: the server
    gives both from one templated text (literal "<image>" restored), with the time bound and the cancel check."""
    bounded = ServedModel(served.model, served.processor, "tiny", max_time=30.0)
    spy = _Spy(bounded.engine)
    monkeypatch.setattr(bounded, "engine", spy)
    processor = served.processor
    for sample, images in CASES:
        stop = lambda: False  # noqa: E731
        bounded.generate(sample, images, SamplingParams(max_new_tokens=2, temperature=0.0), seed=3, should_stop=stop)
        call = spy.calls[-1]
        (raw,), (enc,) = call["raw"], call["encoded"]
        assert raw.text == request_text(processor, sample) and raw.images == images
        assert all(a is b for a, b in zip(raw.images, images))
        ids = processor(text=[raw.text], images=raw.images or None, padding=False, return_tensors="pt")["input_ids"][0]
        assert torch.equal(ids, enc.input_ids)
        assert call["max_seconds"] == 30.0 and call["should_stop"] is stop and call["seeds"] == [3]
    literal = spy.calls[-1]["raw"][0].text  # "Say <image> literally.": text, not an image slot
    assert "Say <image> literally." in literal and LITERAL_IMAGE not in literal
    assert image_token_id(processor) not in spy.calls[-1]["encoded"][0].input_ids.tolist()


def test_engine_vllm_is_built_with_its_settings_and_stopped_by_close(served: ServedModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vlrl.rollout import base
    from vlrl.rollout.hf_engine import HFEngine
    from vlrl.rollout.vllm_engine import VLLMConfig

    class FakeVLLM:
        built: list[dict[str, Any]] = []

        def __init__(self, model: Any, processor: Any, **kwargs: Any) -> None:
            self.built.append(kwargs)
            self.closed = 0

        def close(self) -> None:
            self.closed += 1

    monkeypatch.setitem(base.ENGINES, "vllm", FakeVLLM)
    cfg = VLLMConfig(python="/opt/vllm/bin/python")
    model = ServedModel(served.model, served.processor, "tiny", engine="vllm", vllm=cfg)
    assert FakeVLLM.built == [{"config": cfg}] and isinstance(model.engine, FakeVLLM)
    model.close()
    assert model.engine.closed == 1
    ServedModel(served.model, served.processor, "tiny", engine="vllm")
    assert FakeVLLM.built[-1] == {"config": VLLMConfig()}  # colocated, from the default environment
    hf = ServedModel(served.model, served.processor, "tiny")
    assert isinstance(hf.engine, HFEngine) and hf.engine.reload_weights is False
    hf.close()  # the hf engine runs nothing beside this process
    with pytest.raises(ValueError, match="unknown rollout engine"):
        ServedModel(served.model, served.processor, "tiny", engine="sglang")
