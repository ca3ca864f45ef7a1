"""The pipeline on InternVL for real: the tiny InternVL through align (only the projector trains), a short full
SFT so that rewards vary within groups, then 20 steps of `run_rl` (rollouts by the hf engine with LeanStep,
reference and old log-probs on the shared prefix with shared vision features, two minibatches a step). The weights
move, the rewards are logged, and the engine's sampling log-probs agree with the training forward's. Then the RL
checkpoint through `vlrl eval`'s function, curation and the server's model wrapper (the HTTP server on InternVL:
tests/serve/test_serve_internvl.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlrl.curate.run import CurateConfig, run_curate
from vlrl.data.images import load_image
from vlrl.data.loading import load_samples
from vlrl.eval.evaluate import EvalConfig, run_eval
from vlrl.models.build import init_model
from vlrl.models.loading import load_model_and_processor
from vlrl.rewards.registry import RewardSpec
from vlrl.rollout.types import SamplingParams
from vlrl.serve.generate import ServedModel
from vlrl.train.logging import read_metrics
from vlrl.train.rl import run_rl
from vlrl.train.rl_config import AlgorithmConfig, LoggingConfig, OptimConfig, RLConfig, RolloutConfig
from vlrl.train.sft import SFTConfig, run_sft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_align_sft_and_20_grpo_steps_on_internvl(synth_dir, tmp_path):
    data = [str(synth_dir / "counting" / "train.jsonl")]
    base = init_model("internvl", "tiny", tmp_path / "model", seed=0)
    align = run_sft(SFTConfig(model=str(base), data=data, out=str(tmp_path / "align"), stage="align", max_steps=3,
                              batch_size=8, micro_batch_size=8, lr=1e-3, save_every=100, threads=1))
    before, after = load_file(base / "model.safetensors"), load_file(align / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {k for k in before if k.startswith("multi_modal_projector.")}  # the projector, all of it
    sft = run_sft(SFTConfig(model=str(align), data=data, out=str(tmp_path / "sft"), max_steps=30, batch_size=8,
                            micro_batch_size=8, lr=3e-3, warmup_steps=2, save_every=100, log_every=10, threads=1))
    cfg = RLConfig(model=str(sft), data=data, out=str(tmp_path / "rl"),
                   rewards=[RewardSpec("accuracy"), RewardSpec("answer_format", weight=0.1)], max_steps=20,
                   rollout=RolloutConfig(batch_size=2, group_size=4, max_new_tokens=8, temperature=1.5),
                   algorithm=AlgorithmConfig(advantage="grpo", loss="ppo_clip", beta=0.04, num_minibatches=2),
                   optim=OptimConfig(lr=1e-3), logging=LoggingConfig(save_every=100), micro_batch_size=4,
                   threads=1)
    final = run_rl(cfg)
    before, after = load_file(sft / "model.safetensors"), load_file(final / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before), f"{len(changed)} of {len(before)} tensors changed"
    metrics = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    for m in metrics:
        assert isinstance(m["reward/mean"], float) and isinstance(m["reward/accuracy"], float)
        assert m["updates"] == 2.0
        assert m["rollout/logp_diff"] < 1e-4  # sampling log-probs (engine) = old log-probs (training forward)
    assert any(m["adv/std"] > 0 for m in metrics)  # some groups carried signal
    assert any(m["reward/mean"] > 0 for m in metrics)

    test = [str(synth_dir / "counting" / "test.jsonl")]
    result = run_eval(EvalConfig(model=str(final), data=test, out=str(tmp_path / "eval" / "results.json"), limit=16,
                                 max_new_tokens=8, threads=1))
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0
    report = run_curate(CurateConfig(model=str(final), data=test, out=str(tmp_path / "curate"), n=4, limit=4,
                                     max_new_tokens=8, temperature=1.2, threads=1))
    assert report["by_task"]["counting"]["n"] == 4
    model, processor = load_model_and_processor(final)
    sample = load_samples(test)[0]
    served = ServedModel(model, processor, "tiny-internvl").generate(
        sample, [load_image(p) for p in sample.images], SamplingParams(max_new_tokens=8, temperature=0.0, n=2))
    assert len(served.choices) == 2 and served.choices[0].text == served.choices[1].text
    assert served.prompt_tokens > 16 and served.choices[0].finish_reason in ("stop", "length")
