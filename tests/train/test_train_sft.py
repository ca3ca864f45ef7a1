"""SFT on the tiny model for real: parameters move, loss falls, exact resume after SIGKILL, and torchrun runs of
2 and 4 processes (ddp and fsdp) compute the same loss curve and weights as 1 process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killrun import kill_when_exists
from safetensors.torch import load_file

from vlrl.config import load_config
from vlrl.train.logging import read_metrics
from vlrl.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.slow


def _cfg(model: Path, data: Path, out: Path, **kw) -> SFTConfig:
    base = dict(model=str(model), data=[str(data / "counting" / "train.jsonl"), str(data / "chart" / "train.jsonl")],
                out=str(out), max_steps=6, batch_size=8, micro_batch_size=4, lr=2e-3, warmup_steps=1,
                save_every=3, log_every=1, threads=1)
    base.update(kw)
    return SFTConfig(**base)  # type: ignore[arg-type]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def test_full_sft_moves_parameters_and_lowers_loss(tiny_model_dir, synth_dir, tmp_path):
    final = run_sft(_cfg(tiny_model_dir, synth_dir, tmp_path / "run", max_steps=10))
    before, after = _weights(tiny_model_dir), _weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor trains in the full stage
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "run" / "config.yaml").exists()


def test_cached_encodings_train_the_same_weights(tiny_model_dir, synth_dir, tmp_path):
    """cache_encoded reuses each sample's encoding: 8 steps of 8 over 48 samples (epoch 2 starts at step 7, so
    cached encodings are used), and the weights equal an uncached run's exactly."""
    data = [str(synth_dir / "counting" / "train.jsonl")]
    cfg = dataclasses.replace(_cfg(tiny_model_dir, synth_dir, tmp_path / "plain", max_steps=8), data=data)
    plain = run_sft(cfg)
    cached = run_sft(dataclasses.replace(cfg, out=str(tmp_path / "cached"), cache_encoded=True))
    a, b = _weights(plain), _weights(cached)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_align_stage_trains_only_the_merger(tiny_model_dir, synth_dir, tmp_path):
    final = run_sft(_cfg(tiny_model_dir, synth_dir, tmp_path / "run", stage="align", max_steps=2))
    before, after = _weights(tiny_model_dir), _weights(final)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".merger." in k for k in changed)
    assert {k for k in before if ".merger." in k} == changed


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _sft_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["sft", f"model={model}", f"data=[{data / 'counting' / 'train.jsonl'}]", f"out={out}",
            f"max_steps={steps}", "batch_size=8", "micro_batch_size=4", "save_every=2", "log_every=1",
            "warmup_steps=2", "threads=1", "keep_checkpoints=10"]


def test_sigkill_then_rerun_resumes_exactly(tiny_model_dir, synth_dir, tmp_path):
    ref = _cli(_sft_args(tiny_model_dir, synth_dir, tmp_path / "ref", 8))  # beside the run to kill
    args = _sft_args(tiny_model_dir, synth_dir, tmp_path / "run", 8)
    proc = _cli(args)
    kill_when_exists(proc, tmp_path / "run" / "checkpoints" / "step-4")
    ref_out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_out
    assert not (tmp_path / "run" / "checkpoints" / "step-8").exists()  # it really died mid-run
    again = _cli(args)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert "resumed from" in out
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "step-8"), _weights(tmp_path / "run" / "checkpoints" / "step-8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # no step logged twice after the resume


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """The 4-step run of one process that the torchrun runs are compared with (in this process: no launch to pay
    for)."""
    out = tmp_path_factory.mktemp("sft-one") / "one"
    cfg = load_config(SFTConfig, None, _sft_args(tiny_model_dir, synth_dir, out, 4)[1:])
    before = torch.get_num_threads()
    try:
        run_sft(cfg)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(("parallel", "ranks"), [("ddp", 2), ("fsdp", 2), ("ddp", 4), ("fsdp", 4)])
def test_torchrun_ranks_match_one_process(tiny_model_dir, synth_dir, tmp_path, parallel, ranks, one_process_run):
    (tmp_path / "one").symlink_to(one_process_run, target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
                          "-m", "vlrl.cli", *_sft_args(tiny_model_dir, synth_dir, tmp_path / "two", 4),
                          f"parallel={parallel}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    l1 = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    l2 = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = _weights(tmp_path / "one" / "checkpoints" / "step-4"), _weights(tmp_path / "two" / "checkpoints" / "step-4")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["target_tokens"] > 0


@pytest.mark.parametrize("agg", ["token", "sample"])
def test_sft_loss_equals_cross_entropy_over_the_full_logits(tiny_model_dir, synth_dir, agg):
    """`_micro_loss` (logits only where a target follows) against the plain recipe: every position's logits,
    shifted labels, cross-entropy per target token, aggregated by hand. Loss and gradients agree."""
    import torch.nn.functional as F

    from vlrl.data.loading import load_samples
    from vlrl.models.inputs import IGNORE_INDEX, collate, encode_for_sft
    from vlrl.models.loading import load_model_and_processor
    from vlrl.models.processor import image_token_id
    from vlrl.train.sft import _micro_loss

    model, processor = load_model_and_processor(tiny_model_dir)
    samples = load_samples([str(synth_dir / t / "train.jsonl") for t in ("counting", "chart", "grounding")])
    items = encode_for_sft(processor, [samples[i] for i in (0, 50, 100, 1, 51)])  # answers of 1 and ~12 tokens
    batch = collate(items, processor.tokenizer.pad_token_id, image_token_id(processor), padding_side="right")
    n_global = 7  # this micro-batch's share of a larger global batch

    model.zero_grad()
    loss, value = _micro_loss(model, dict(batch), agg, n_global)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    plain = dict(batch)
    labels = plain.pop("labels")
    logits = model(**plain).logits  # [b, L, V]
    want = torch.zeros(())
    for r in range(labels.shape[0]):
        terms = [F.cross_entropy(logits[r, p - 1][None].float(), labels[r, p][None])
                 for p in range(1, labels.shape[1]) if labels[r, p] != IGNORE_INDEX]
        assert terms
        want = want + (sum(terms) if agg == "token" else sum(terms) / len(terms))
    want = want / n_global
    want.backward()
    assert abs(value - float(want.detach())) < 1e-5 and torch.allclose(loss.detach(), want.detach(), atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n
