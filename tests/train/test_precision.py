"""`dtype` in training: bfloat16 is mixed precision (bf16 forwards, fp32 master weights, gradients and AdamW state);
pure_bfloat16 keeps everything in bf16, and at the learning rates of the RL recipes its weights barely move."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlrl.train.precision import PRECISIONS, precision_of
from vlrl.train.sft import SFTConfig, run_sft


def test_the_table():
    assert precision_of("float32").param_dtype == torch.float32
    assert precision_of("float32").compute_dtype == torch.float32
    mixed = precision_of("bfloat16")
    assert (mixed.param_dtype, mixed.compute_dtype, mixed.mixed) == (torch.float32, torch.bfloat16, True)
    pure = precision_of("pure_bfloat16")
    assert (pure.param_dtype, pure.compute_dtype, pure.mixed) == (torch.bfloat16, torch.bfloat16, False)
    assert set(PRECISIONS) == {"float32", "bfloat16", "pure_bfloat16"}


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="loss scaling"):
        precision_of("float16")
    with pytest.raises(ValueError, match="float32, bfloat16, pure_bfloat16"):
        precision_of("float8")


def test_mixed_forwards_compute_in_bf16_and_keep_fp32_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with precision_of("bfloat16").autocast(torch.device("cpu")):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    with precision_of("float32").autocast(torch.device("cpu")):
        assert layer(x).dtype == torch.float32


def _decoder_linears(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder layers' projection weights: every element gets a gradient from every batch."""
    return {k: v for k, v in weights.items()
            if ".layers." in k and "visual" not in k and k.endswith("proj.weight")}


@pytest.mark.slow
def test_small_learning_rate_moves_every_master_weight_only_in_mixed_precision(tiny_model_dir, synth_dir, tmp_path):
    """5 AdamW steps at lr 1e-6 (the RL recipes' rate): with fp32 master weights every decoder projection
    weight changes; stored in bf16 most cannot (a bf16 number near 0.02 has a spacing of about 1.2e-4)."""
    start = _decoder_linears(load_file(tiny_model_dir / "model.safetensors"))
    assert start and all(v.dtype == torch.float32 for v in start.values())
    moved = {}
    for dtype in ("bfloat16", "pure_bfloat16"):
        cfg = SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                        out=str(tmp_path / dtype), max_steps=5, batch_size=4, micro_batch_size=4, lr=1e-6,
                        warmup_steps=0, min_lr_ratio=1.0, save_every=0, log_every=1, threads=1, dtype=dtype)
        final = _decoder_linears(load_file(run_sft(cfg) / "model.safetensors"))
        if dtype == "bfloat16":  # the checkpoint holds the fp32 master weights
            assert all(v.dtype == torch.float32 for v in final.values())
        changed = sum(int((final[k] != start[k].to(final[k].dtype)).sum()) for k in start)  # bf16: rounded start
        moved[dtype] = changed / sum(v.numel() for v in start.values())
    assert moved["bfloat16"] > 0.999
    assert moved["pure_bfloat16"] < 0.2


@pytest.mark.slow
def test_rl_step_in_mixed_precision(tiny_model_dir, synth_dir, tmp_path):
    """RL with dtype bfloat16: the policy's training forwards and the reference run in bf16, the policy's weights,
    gradients and AdamW moments are fp32, and one step moves the weights."""
    from vlrl import recipes_dir
    from vlrl.config import load_config
    from vlrl.train.dist import init_distributed
    from vlrl.train.rl import RLConfig, build_run, close_run, rl_step

    data = synth_dir / "counting" / "train.jsonl"
    over = {"model": tiny_model_dir, "data": f"[{data}]", "replay.data": f"[{data}]", "validation.data": "[]",
            "out": tmp_path / "run",
            "max_steps": 1, "rollout.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
            "algorithm.beta": 0.04, "threads": 1, "dtype": "bfloat16", "optim.lr": 1e-6}
    cfg = load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()])
    before = torch.get_num_threads()
    run = build_run(cfg, init_distributed(), str(tiny_model_dir))
    try:
        assert run.ref is not None and {p.dtype for p in run.ref.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in run.model.parameters()} == {torch.float32}
        seen: dict[str, set[torch.dtype]] = {"policy": set(), "ref": set()}
        policy_proj = next(m for n, m in run.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        ref_proj = next(m for n, m in run.ref.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        policy_proj.register_forward_hook(lambda m, i, o: seen["policy"].add(o.dtype))
        ref_proj.register_forward_hook(lambda m, i, o: seen["ref"].add(o.dtype))
        start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        metrics, _, _ = rl_step(run, 0, 0)
        assert seen["ref"] == {torch.bfloat16}
        assert torch.bfloat16 in seen["policy"]  # the training forward (the rollout decodes in its own loop)
        assert metrics["grad_norm"] > 0
        state = [s for s in run.opt.state.values() if "exp_avg" in s]
        assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)
        moved = [n for n, p in run.model.named_parameters() if not torch.equal(p, start[n])]
        assert len(moved) > 0.5 * len(start)
    finally:
        close_run(run)
        torch.set_num_threads(before)


@pytest.mark.slow
def test_five_rl_steps_at_lr_1e6_mixed_moves_the_weights_as_fp32_does_pure_bf16_not(tiny_model_dir, synth_dir,
                                                                                     tmp_path):
    """The reason mixed precision is the `bfloat16` default: 5 GRPO steps at lr 1e-6 (every weight trains, no
    weight decay, from a briefly SFT-ed model so that rewards vary) change > 90% of the fp32 master weights' elements,
    and the update is the fp32 run's within bf16 tolerance; pure bf16 leaves most elements where they were."""
    from vlrl import recipes_dir
    from vlrl.config import load_config
    from vlrl.train.rl import RLConfig, run_rl

    data = synth_dir / "counting" / "train.jsonl"
    sft = run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(data)], out=str(tmp_path / "sft"), max_steps=10,
                            batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=2, save_every=0, log_every=5,
                            threads=1))
    start = load_file(sft / "model.safetensors")
    final = {}
    for dtype in ("float32", "bfloat16", "pure_bfloat16"):
        over = {"model": sft, "data": f"[{data}]", "replay.data": f"[{data}]", "validation.data": "[]",
                "out": tmp_path / dtype, "max_steps": 5, "rollout.batch_size": 2, "rollout.group_size": 4,
                "rollout.max_new_tokens": 8, "threads": 1, "dtype": dtype, "optim.lr": 1e-6,
                "optim.warmup_steps": 0, "optim.weight_decay": 0.0, "optim.freeze_vision": "false",
                "logging.save_every": 0}
        cfg = load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()])
        final[dtype] = load_file(run_rl(cfg) / "model.safetensors")
    n = sum(v.numel() for v in start.values())

    def moved(weights: dict[str, torch.Tensor]) -> float:
        return sum(int((weights[k] != start[k].to(weights[k].dtype)).sum()) for k in start) / n

    assert {v.dtype for v in final["bfloat16"].values()} == {torch.float32}  # the checkpoint: master weights
    assert moved(final["float32"]) > 0.9 and moved(final["bfloat16"]) > 0.9
    assert moved(final["pure_bfloat16"]) < 0.2
    d32 = torch.cat([(final["float32"][k] - start[k]).flatten() for k in start])
    d16 = torch.cat([(final["bfloat16"][k] - start[k]).flatten() for k in start])
    assert float(torch.nn.functional.cosine_similarity(d32, d16, dim=0)) > 0.99
    assert float((d16 - d32).norm() / d32.norm()) < 0.1  # bf16 forwards: ~3 significant digits
