"""LoRA through peft on the tiny model: which layers get adapters, RL and SFT that change only the adapters, the
reference log-probs of the base model with the adapters disabled, adapter checkpoints that resume exactly, and a
merged export that `from_pretrained` loads with the trainer's log-probs; the same under FSDP2 at 2 ranks, equal to
one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.data.loading import load_samples
from vlrl.models.loading import load_model, load_model_and_processor
from vlrl.models.lora import ADAPTER_CONFIG, LoRAConfig, add_lora, is_adapters, lora_targets
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams, make_engine
from vlrl.train.dist import DistInfo
from vlrl.train.logging import read_metrics
from vlrl.train.logprobs import rows_logprobs_nograd
from vlrl.train.parallel import trainable_state, wrap
from vlrl.train.precision import precision_of
from vlrl.train.rl import RLConfig, run_rl
from vlrl.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_targets_are_the_text_decoders_linears_unless_vision(tiny_model_dir):
    model = load_model(tiny_model_dir)
    text = lora_targets(model, LoRAConfig(r=4))
    assert text and all("visual" not in n for n in text)
    assert {n.rsplit(".", 1)[-1] for n in text} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    layers = model.config.get_text_config().num_hidden_layers
    assert len(text) == 7 * layers
    both = lora_targets(model, LoRAConfig(r=4, vision=True, target_modules=["q_proj", "qkv", "fc1", "fc2"]))
    assert any("visual" in n for n in both) and set(text) & set(both) == {n for n in text if n.endswith("q_proj")}


def test_fresh_adapters_change_nothing_and_train_alone(tiny_model_dir):
    model = load_model(tiny_model_dir)
    x = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    before = model(**x).logits
    peft = add_lora(model, LoRAConfig(r=4, alpha=8), tiny_model_dir)
    trainable = [n for n, p in peft.get_base_model().named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(peft.get_base_model()(**x).logits, before)  # lora_B starts at zero
    cfg = json.loads((Path(peft.peft_config["default"].base_model_name_or_path) / "config.json").read_text())
    assert cfg["model_type"] == model.config.model_type  # the base is named by its absolute path


def test_a_checkpoint_of_adapters_is_told_from_one_of_the_model(tiny_model_dir):
    """`is_adapters` picks what a checkpoint gathers under FSDP2 (`RunHarness.save`): the adapters of a peft model
    only; without FSDP2 nothing is gathered (`save_pretrained` reads the model itself)."""
    model = load_model(tiny_model_dir)
    assert not is_adapters(model)
    peft = add_lora(model, LoRAConfig(r=4, alpha=8), tiny_model_dir)
    assert is_adapters(peft) and not is_adapters(peft.get_base_model())
    assert trainable_state(wrap(model, "fsdp", DistInfo(0, 1, 0, torch.device("cpu")), precision_of("float32")),
                           peft) is None  # one process without a process group: a plain root


def _rl_args(model: Path, data: Path, out: Path, steps: int, **extra) -> list[str]:
    over = {"model": model, "data": f"[{data}]", "replay.data": f"[{data}]", "validation.data": "[]", "out": out,
            "max_steps": steps, "rollout.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
            "threads": 1, "algorithm.beta": 0.04, "optim.lr": 5e-3, "logging.save_every": 1,
            "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, **extra}
    return [f"{k}={v}" for k, v in over.items()]


def _rl(model: Path, data: Path, out: Path, steps: int, **extra) -> RLConfig:
    return load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", _rl_args(model, data, out, steps, **extra))


@pytest.fixture(scope="module")
def sft_start(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """A briefly SFT-ed model (full fine-tuning), so that RL rewards vary."""
    out = tmp_path_factory.mktemp("lora-sft-start")
    return run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                             out=str(out), max_steps=10, batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=2,
                             save_every=0, log_every=5, threads=1))


@pytest.fixture(scope="module")
def whole(sft_start, synth_dir, tmp_path_factory) -> Path:
    """The final (step-3) checkpoint of a 3-step LoRA GRPO run in one process (step-2 kept beside it)."""
    return run_rl(_rl(sft_start, synth_dir / "counting" / "train.jsonl", tmp_path_factory.mktemp("lora-rl"), 3))


def _logprobs_agree(got: Any, want: Any, processor: Any, data: Path, atol: float) -> tuple[list, list, dict]:
    """Assert that models `got` and `want` give the same log-probs, within `atol`, to 8 completions that `got`
    samples for 2 prompts of `data`; returns those completions (groups, rows) and the log-prob arguments."""
    groups = make_engine("hf", got, processor).generate(load_samples([str(data)])[:2], 4,
                                                       SamplingParams(max_new_tokens=8), seeds=[1, 2])
    rows = [(g, j) for g in range(2) for j in range(4)]  # 8 completions
    kw = dict(micro_batch_size=8, temperature=1.0, suppress_ids=vision_token_ids(processor.tokenizer),
              device=torch.device("cpu"), pad_id=processor.tokenizer.pad_token_id, image_id=image_token_id(processor))
    for a, b in zip(rows_logprobs_nograd(got, groups, rows, **kw), rows_logprobs_nograd(want, groups, rows, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    return groups, rows, kw


def _trainer(base: Path, adapters: Path) -> tuple[Any, Any]:
    """The trainer's model of an adapter checkpoint (the adapters injected into the base model) and its processor."""
    from peft import PeftModel

    model, processor = load_model_and_processor(base)
    return PeftModel.from_pretrained(model, str(adapters)).get_base_model(), processor


@pytest.mark.slow
def test_rl_with_lora_trains_only_adapters_resumes_exactly_and_exports(sft_start, whole, synth_dir, tmp_path):
    data = synth_dir / "counting" / "train.jsonl"
    files = {p.name for p in whole.iterdir()}
    assert {ADAPTER_CONFIG, "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    adapters = load_file(whole / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # the adapters trained

    # stop after 2 steps, then the same run to 3: it resumes from the step-2 adapters, optimizer and RNG
    run_rl(_rl(sft_start, data, tmp_path / "split", 2))
    resumed = run_rl(_rl(sft_start, data, tmp_path / "split", 3))
    again = load_file(resumed / "adapter_model.safetensors")
    assert again.keys() == adapters.keys()
    for k in adapters:
        torch.testing.assert_close(again[k], adapters[k], rtol=0, atol=0)

    # the merged export: a plain folder that transformers loads, with the trainer's log-probs
    from vlrl.cli import main

    assert main(["export", "--checkpoint", str(whole), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    base = load_model(sft_start)
    base_w, merged_w = base.state_dict(), merged.state_dict()
    assert any(not torch.equal(base_w[k], merged_w[k]) for k in base_w if "layers" in k and "proj" in k)
    assert all(torch.equal(base_w[k], merged_w[k]) for k in base_w if "visual" in k)  # no adapters there
    trainer, processor = _trainer(sft_start, whole)
    groups, rows, kw = _logprobs_agree(merged, trainer, processor, data, atol=1e-5)

    # the reference under LoRA is the base model: adapters disabled give the start model's log-probs
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_model(sft_start), str(whole))
    with peft.disable_adapter():
        off = rows_logprobs_nograd(peft.get_base_model(), groups, rows, **kw)
    for a, b in zip(off, rows_logprobs_nograd(base, groups, rows, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_fsdp_lora_rl_matches_one_process_resumes_in_one_and_exports(sft_start, whole, synth_dir, tmp_path, capsys):
    """LoRA under FSDP2 at 2 ranks: GRPO with a KL term (its reference = the sharded policy with the adapters
    disabled) trains the adapters alone, to those of the 1-process run of the same global batch (`whole`); the
    adapter checkpoint, gathered to rank 0, resumes in one process and exports to a merged folder that
    `from_pretrained` loads with the trainer's log-probs. tiny-grpo's learning rate depends on the step only
    (min_lr_ratio 1), so a 3-step run's first 2 steps are a 2-step run's."""
    data = synth_dir / "counting" / "train.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
                          "vlrl.cli", "rl", "--config", str(recipes_dir() / "tiny-grpo.yaml"),
                          *_rl_args(sft_start, data, tmp_path / "two", 2, parallel="fsdp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    m1, m2 = read_metrics(whole.parents[1] / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == 3 and len(m2) == 2
    for a, b in zip(m1, m2):  # kl: the sharded disabled-adapter reference gives the 1-process one's
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key

    # the checkpoint is the adapter folder of one process: the adapters alone, under the same names, equal
    ckpt = tmp_path / "two" / "checkpoints" / "step-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {ADAPTER_CONFIG, "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    got = load_file(ckpt / "adapter_model.safetensors")
    assert all("lora_" in k for k in got)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # they trained
    assert _close(got, load_file(whole.parent / "step-2" / "adapter_model.safetensors")) < 1e-4

    # it resumes in one process (adapters and optimizer state whole) to the 1-process step 3
    capsys.readouterr()
    again = run_rl(_rl(sft_start, data, tmp_path / "two", 3))
    assert f"resumed from {ckpt}" in capsys.readouterr().out and again.name == "step-3"
    assert _close(load_file(again / "adapter_model.safetensors"), load_file(whole / "adapter_model.safetensors")) < 1e-4

    # the merged export: only the decoder's adapted projections differ from the start model; the trainer's log-probs
    from vlrl.cli import main

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    start, after = load_model(sft_start).state_dict(), merged.state_dict()
    assert start.keys() == after.keys()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all("language_model.layers" in k and k.rsplit(".", 2)[-2].endswith("proj") for k in changed)
    trainer, processor = _trainer(sft_start, ckpt)
    _logprobs_agree(merged, trainer, processor, data, atol=1e-5)


@pytest.mark.slow
def test_sft_with_lora_changes_only_adapters(tiny_model_dir, synth_dir, tmp_path):
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                    out=str(tmp_path / "run"), max_steps=4, batch_size=8, micro_batch_size=8, lr=3e-3,
                    warmup_steps=0, save_every=0, log_every=1, threads=1, lora=LoRAConfig(r=4, alpha=8))
    final = run_sft(cfg)
    assert (final / ADAPTER_CONFIG).exists() and not (final / "model.safetensors").exists()
    merged = load_model(final)  # an adapter folder loads merged into its base
    start = load_model(tiny_model_dir).state_dict()
    after = merged.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.rsplit(".", 2)[-2].endswith("proj") for k in changed)
    assert not any("visual" in k or "embed" in k or "norm" in k for k in changed)


def test_lora_settings_are_checked_before_loading(tmp_path):
    for bad, key in (({"lora.r": -1}, "lora.r"), ({"lora.r": 4, "lora.dropout": 1.5}, "lora.dropout"),
                     ({"lora.r": 4, "rollout.engine": "vllm"}, "lora")):
        over = {"model": tmp_path, "data": "[x.jsonl]", "out": tmp_path / "o", **bad}
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()])
    with pytest.raises(ValueError, match="stage full"):
        SFTConfig(model=str(tmp_path), data=["x.jsonl"], out=str(tmp_path / "o"), stage="align",
                  lora=LoRAConfig(r=4))
