"""LoRA through peft on the tiny model: which layers get adapters, RL and SFT that change only the adapters, the
reference log-probs of the base model with the adapters disabled, adapter checkpoints that resume exactly, and a
merged export that `from_pretrained` loads with the trainer's log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.models.loading import load_model, load_model_and_processor
from vlrl.models.lora import ADAPTER_CONFIG, LoRAConfig, add_lora, lora_targets
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rollout import SamplingParams, make_engine
from vlrl.train.logprobs import rows_logprobs_nograd
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


def _rl(model: Path, data: Path, out: Path, steps: int, **extra) -> RLConfig:
    over = {"model": model, "data": f"[{data}]", "replay.data": f"[{data}]", "validation.data": "[]", "out": out,
            "max_steps": steps, "rollout.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
            "threads": 1, "algorithm.beta": 0.04, "optim.lr": 5e-3, "logging.save_every": 1,
            "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, **extra}
    return load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def sft_start(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """A briefly SFT-ed model (full fine-tuning), so that RL rewards vary."""
    out = tmp_path_factory.mktemp("lora-sft-start")
    return run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                             out=str(out), max_steps=10, batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=2,
                             save_every=0, log_every=5, threads=1))


@pytest.mark.slow
def test_rl_with_lora_trains_only_adapters_resumes_exactly_and_exports(sft_start, synth_dir, tmp_path):
    data = synth_dir / "counting" / "train.jsonl"
    whole = run_rl(_rl(sft_start, data, tmp_path / "whole", 3))
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

    from peft import PeftModel

    trainer, processor = load_model_and_processor(sft_start)
    trainer = PeftModel.from_pretrained(trainer, str(whole)).get_base_model()
    prompts = __import__("vlrl.data.loading", fromlist=["load_samples"]).load_samples([str(data)])[:2]
    groups = make_engine("hf", merged, processor).generate(prompts, 4, SamplingParams(max_new_tokens=8),
                                                          seeds=[1, 2])
    rows = [(g, j) for g in range(2) for j in range(4)]  # 8 completions
    kw = dict(micro_batch_size=8, temperature=1.0, suppress_ids=vision_token_ids(processor.tokenizer),
              device=torch.device("cpu"), pad_id=processor.tokenizer.pad_token_id, image_id=image_token_id(processor))
    want = rows_logprobs_nograd(trainer, groups, rows, **kw)
    got = rows_logprobs_nograd(merged, groups, rows, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    # the reference under LoRA is the base model: adapters disabled give the start model's log-probs
    peft = PeftModel.from_pretrained(load_model(sft_start), str(whole))
    with peft.disable_adapter():
        off = rows_logprobs_nograd(peft.get_base_model(), groups, rows, **kw)
    for a, b in zip(off, rows_logprobs_nograd(base, groups, rows, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


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
