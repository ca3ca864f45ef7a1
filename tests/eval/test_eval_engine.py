"""Evaluation through the rollout engine: greedy texts equal to Hugging Face `generate` (the path eval used before),
scoring with reward specs and a threshold, pass@1 / pass@n by hand, reproducible sampled evaluation, and `vlrl
eval` equal to the RL run's validation item by item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import jitter_text_weights

from vlrl.data.loading import load_samples
from vlrl.data.sample import Sample
from vlrl.eval import evaluate as ev
from vlrl.eval.evaluate import EvalConfig, evaluate_samples, run_eval, score_prediction, write_results
from vlrl.models.inputs import collate, encode_for_generation
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rewards.registry import RewardSpec
from vlrl.rollout.hf_engine import HFEngine
from vlrl.rollout.sampler import mix_seed
from vlrl.rollout.types import Completion, Group, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = ("counting", "chart", "compare", "grounding")


@torch.no_grad()
def hf_generate_greedy(model: Any, processor: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """The oracle: eval's former path (`vlrl.rollout.hf.generate_texts`, greedy): HF `generate` on the left-padded
    batch, stopping at the tokenizer's EOS, vision tokens suppressed, decoded with special tokens skipped."""
    tok = processor.tokenizer
    batch = collate(encode_for_generation(processor, samples), tok.pad_token_id, image_token_id(processor),
                    padding_side="left")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, suppress_tokens=vision_token_ids(tok),
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
                         temperature=None, top_p=None, top_k=None)  # [B, L + T]
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _sorted_like_eval(samples: list[Sample]) -> list[Sample]:
    """The order `generate_completions` sends prompts in, so that both paths see the same batch."""
    return sorted(samples, key=lambda s: (len(s.images), len(s.messages[-1]["content"])))


@pytest.fixture(scope="module")
def items(synth_dir) -> list[Sample]:
    """16 synthetic test items, 4 of each task (multiple choice, numbers, yes/no, boxes)."""
    out: list[Sample] = []
    for task in TASKS:
        out += load_samples([str(synth_dir / task / "test.jsonl")])[:4]
    return _sorted_like_eval(out)


@pytest.fixture(scope="module")
def varied_model(tiny_model_dir):
    """The random tiny model with its text weights jittered (std 0.05): its greedy answers differ from prompt to
    prompt (the untouched random model repeats one token for every prompt)."""
    model, processor = load_model_and_processor(tiny_model_dir)
    return jitter_text_weights(model).eval(), processor


@pytest.fixture(scope="module")
def sft_ckpt(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """40 SFT steps on counting: the model answers `<answer>N</answer>` and stops, right on some items."""
    from vlrl.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                    out=str(tmp_path_factory.mktemp("eval-sft")), max_steps=40, batch_size=8, micro_batch_size=8,
                    lr=3e-3, warmup_steps=4, save_every=100, log_every=20, threads=1)
    before = torch.get_num_threads()
    try:
        return run_sft(cfg)
    finally:
        torch.set_num_threads(before)


def _check_greedy_equals_generate(model: Any, processor: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
    tok = processor.tokenizer
    assert HFEngine(model, processor).stop_ids == [tok.eos_token_id]  # the tiny model's only stop token
    want = hf_generate_greedy(model, processor, samples, max_new_tokens)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for lean in (False, True):
        groups = HFEngine(model, processor, lean_step=lean).generate(samples, 1, greedy)
        assert [g.completions[0].text for g in groups] == want, f"lean_step={lean}"
    result = evaluate_samples(model, processor, samples, batch_size=len(samples), max_new_tokens=max_new_tokens)
    assert [p["completion"] for p in result.predictions] == want
    assert result.accuracy == sum(score_prediction(s, t) for s, t in zip(samples, want)) / len(samples)
    return want


def test_greedy_eval_equals_hf_generate_on_varied_answers(varied_model, items):
    model, processor = varied_model
    texts = _check_greedy_equals_generate(model, processor, items, max_new_tokens=16)
    assert len(set(texts)) >= 12  # the answers differ, so equality is not one repeated token


@pytest.mark.slow
def test_greedy_eval_equals_hf_generate_after_sft(sft_ckpt, items):
    model, processor = load_model_and_processor(sft_ckpt)
    texts = _check_greedy_equals_generate(model.eval(), processor, items, max_new_tokens=8)
    assert all(t.startswith("<answer>") for t in texts)  # the tags survive decoding
    assert any(t.endswith("</answer>") for t in texts)  # and completions stop at EOS


class ScriptedEngine:
    """A `RolloutEngine` whose completions are given: prompt id -> its n texts. Records the seeds it was given."""

    def __init__(self, texts: dict[str, list[str]]) -> None:
        self.texts = texts
        self.seeds: dict[str, int | None] = {}

    def generate(self, prompts, n, sampling, *, seeds=None, **_: Any) -> list[Group]:
        groups = []
        for i, s in enumerate(prompts):
            self.seeds[s.id] = None if seeds is None else seeds[i]
            cs = [Completion(token_ids=torch.zeros(3, dtype=torch.long), text=t, logprobs=torch.zeros(3),
                             truncated=False) for t in self.texts[s.id][:n]]
            groups.append(Group(sample=s, prompt=None, completions=cs))  # type: ignore[arg-type]
        return groups

    def sync_weights(self, model: Any) -> None:
        pass


def _item(id_: str, task: str, answer: str, problem_type: str = "numerical", **meta: Any) -> Sample:
    return Sample(id=id_, images=[], messages=[{"role": "user", "content": "q" * len(id_)}], answer=answer,
                  problem_type=problem_type, metadata={"task": task, **meta})


def _scripted(monkeypatch, texts: dict[str, list[str]]) -> ScriptedEngine:
    engine = ScriptedEngine(texts)
    monkeypatch.setattr(ev, "make_engine", lambda *a, **k: engine)
    return engine


def test_pass_at_k_by_hand(monkeypatch, tmp_path):
    items = [_item("a", "t1", "3"), _item("bb", "t1", "4"), _item("ccc", "t2", "5"), _item("dddd", "t2", "abc")]
    right, wrong = "<answer>{}</answer>", "<answer>9</answer>"
    engine = _scripted(monkeypatch, {
        "a": [right.format(3)] * 4,  # 4 / 4
        "bb": [wrong, right.format(4), wrong, wrong],  # 1 / 4
        "ccc": [wrong] * 4,  # 0 / 4
        "dddd": [right.format("abc")] * 4,  # a numerical gold that is no number: unscorable, so wrong
    })
    result = evaluate_samples(None, None, items, n=4, temperature=1.0, seed=7, batch_size=3)
    assert engine.seeds == {s.id: mix_seed(7, i) for i, s in enumerate(items)}  # seeded by position
    assert [p["correct"] for p in result.predictions] == [1.0, 0.25, 0.0, 0.0]
    assert [p["pass_at_n"] for p in result.predictions] == [1.0, 1.0, 0.0, 0.0]
    assert result.predictions[3]["rewards"] == [None] * 4
    assert result.accuracy == pytest.approx(1.25 / 4) and result.pass_at_n == 0.5
    assert result.by_task == {"t1": {"n": 2, "accuracy": 0.625, "pass_at_1": 0.625, "pass_at_n": 1.0},
                              "t2": {"n": 2, "accuracy": 0.0, "pass_at_1": 0.0, "pass_at_n": 0.0}}
    summary = write_results(result, tmp_path / "r.json")
    assert (summary["samples_per_item"], summary["pass_at_1"], summary["pass_at_n"]) == (4, result.accuracy, 0.5)


def test_greedy_n1_keeps_the_result_format(monkeypatch, tmp_path):
    items = [_item("a", "t1", "3"), _item("bb", "t1", "4")]
    engine = _scripted(monkeypatch, {"a": ["<answer>3</answer>"], "bb": ["<answer>5</answer>"]})
    result = evaluate_samples(None, None, items)
    assert engine.seeds == {"a": None, "bb": None}  # greedy: no seeds
    assert result.predictions[0] == {"id": "a", "task": "t1", "category": "t1", "problem_type": "numerical",
                                     "answer": "3", "completion": "<answer>3</answer>", "extracted": "3",
                                     "reward": 1.0, "correct": 1.0}
    summary = write_results(result, tmp_path / "r.json", {"model": "m"})
    assert set(summary) == {"n", "accuracy", "by_task", "by_category", "predictions", "seconds", "model"}
    assert summary["by_task"] == {"t1": {"n": 2, "accuracy": 0.5}}


def test_rewards_and_threshold(monkeypatch):
    box = {"image_size": [112, 112]}
    items = [_item("a", "t", "3"), _item("bb", "t", "3"), _item("g", "t", "[10, 10, 30, 30]", "grounding", **box)]
    _scripted(monkeypatch, {"a": ["<answer>3</answer>"], "bb": ["3"],
                            "g": ["<answer>[12, 10, 32, 30]</answer>"]})  # IoU 0.82
    default = evaluate_samples(None, None, items)
    assert [p["correct"] for p in default.predictions] == [1.0, 1.0, 1.0]
    both = [RewardSpec("accuracy"), RewardSpec("answer_format", weight=0.5)]
    strict = evaluate_samples(None, None, items, rewards=both, threshold=1.5)  # right and well formed
    assert [p["reward"] for p in strict.predictions[:2]] == [1.5, 1.0]
    assert [p["correct"] for p in strict.predictions] == [1.0, 0.0, 1.0]
    iou = [RewardSpec("accuracy", kwargs={"grounding_metric": "iou"})]
    assert evaluate_samples(None, None, items[2:], rewards=iou, threshold=0.9).accuracy == 0.0


def test_config_checks():
    with pytest.raises(ValueError, match="temperature > 0"):
        EvalConfig(model="m", data=["d"], out="o", n=4)
    cfg = EvalConfig(model="m", data=["d"], out="o", reward=["accuracy", "format"], n=4, temperature=1.0)
    assert [r.name for r in cfg.rewards] == ["accuracy", "format"] and cfg.reward == []


def test_sampled_eval_is_reproducible(varied_model, items):
    model, processor = varied_model
    kw: dict[str, Any] = dict(max_new_tokens=6, n=3, temperature=1.0, batch_size=8)
    a = evaluate_samples(model, processor, items[:8], seed=1, **kw)
    b = evaluate_samples(model, processor, items[:8], seed=1, **kw)
    c = evaluate_samples(model, processor, items[:8], seed=2, **kw)
    assert [p["completions"] for p in a.predictions] == [p["completions"] for p in b.predictions]
    assert [p["completions"] for p in a.predictions] != [p["completions"] for p in c.predictions]
    assert all(len(set(p["completions"])) > 1 for p in a.predictions)  # sampled, not greedy


@pytest.mark.slow
def test_vlrl_eval_equals_the_rl_runs_validation(sft_ckpt, synth_dir, tmp_path):
    """`vlrl eval` of a checkpoint and an RL run's validation of it on the same items: the same completions and
    the same verdicts, item by item (both call `evaluate_samples`; the run's validation scores with its own
    `accuracy` check only, not its format reward)."""
    from vlrl.train.dist import DistInfo
    from vlrl.train.rl import _load_val, _validate, build_run, validation_result
    from vlrl.train.rl_config import RLConfig, ValidationConfig

    val = str(synth_dir / "counting" / "test.jsonl")
    summary = run_eval(EvalConfig(model=str(sft_ckpt), data=[val], out=str(tmp_path / "eval.json"), limit=16,
                                  max_new_tokens=8))
    cfg = RLConfig(model=str(sft_ckpt), data=[val], out=str(tmp_path / "rl"),
                   validation=ValidationConfig(data=[val], limit=16, max_new_tokens=8),
                   rewards=[RewardSpec("accuracy"), RewardSpec("answer_format", weight=0.1)])
    run = build_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), str(sft_ckpt))
    samples = _load_val(cfg)
    result = validation_result(run, samples)
    assert result is not None
    preds = [json.loads(line) for line in open(summary["predictions"])]
    key = ("id", "completion", "reward", "correct")
    assert [[p[k] for k in key] for p in preds] == [[p[k] for k in key] for p in result.predictions]
    assert 0 < summary["accuracy"] < 1 and result.accuracy == summary["accuracy"]
    metrics = _validate(run, samples)
    assert metrics == {"val_accuracy": summary["accuracy"],
                       "val_accuracy/counting": summary["by_task"]["counting"]["accuracy"]}


def test_engine_setting_is_checked_and_vllm_needs_its_environment_or_a_url(tmp_path):
    from vlrl.rollout.vllm_engine import VLLMConfig

    with pytest.raises(ValueError, match="engine: unknown value 'sglang'"):
        EvalConfig(model="m", data=["d"], out="o", engine="sglang")
    nowhere = VLLMConfig(python=str(tmp_path / "no-env" / "python"))
    with pytest.raises(ValueError, match="vllm.python: no vLLM environment"):
        EvalConfig(model="m", data=["d"], out="o", engine="vllm", vllm=nowhere)
    with pytest.raises(ValueError, match="vllm.request_timeout must be > 0"):
        EvalConfig(model="m", data=["d"], out="o", vllm=VLLMConfig(request_timeout=0))
    EvalConfig(model="m", data=["d"], out="o", vllm=nowhere)  # the hf engine does not need it
    EvalConfig(model="m", data=["d"], out="o", engine="vllm", vllm=VLLMConfig(url="http://127.0.0.1:8100"))


def test_run_eval_with_engine_vllm_passes_its_settings_and_closes_the_engine(synth_dir, tmp_path, monkeypatch):
    from vlrl.rollout.vllm_engine import VLLMConfig

    class Closing(ScriptedEngine):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    data = [str(synth_dir / "counting" / "test.jsonl")]
    ids = [s.id for s in load_samples(data, limit=3)]
    engine = Closing({i: ["<answer>3</answer>"] for i in ids})
    made: list[tuple[str, dict[str, Any]]] = []

    def fake_make_engine(name: str, model: Any, processor: Any, **kwargs: Any) -> Closing:
        made.append((name, kwargs))
        return engine

    monkeypatch.setattr(ev, "make_engine", fake_make_engine)
    monkeypatch.setattr(ev, "load_model_and_processor", lambda *a, **k: (None, None))
    server = VLLMConfig(url="http://127.0.0.1:8100", retries=0)
    summary = run_eval(EvalConfig(model="m", data=data, out=str(tmp_path / "r.json"), limit=3, engine="vllm",
                                  vllm=server))
    assert made == [("vllm", {"config": server})] and engine.closed == 1
    assert summary["n"] == 3 and set(engine.seeds) == set(ids)
    made.clear()
    run_eval(EvalConfig(model="m", data=data, out=str(tmp_path / "hf.json"), limit=3))  # the default: hf
    assert [name for name, _ in made] == ["hf"]
