"""Fast checks of the RL loop's pieces: the data stream, dynamic sampling (with a scripted engine), training
log-probs against the engine's sampling log-probs, and the loss normalisation that makes the update
independent of micro-batching (and so of world size)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from vlrl.algos import POLICY_LOSSES, agg_loss
from vlrl.config import ConfigError, build
from vlrl.data.loading import load_samples
from vlrl.data.order import global_batch
from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded
from vlrl.models.loading import load_model_and_processor
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rewards.registry import RewardSpec
from vlrl.rollout import Completion, Group, SamplingParams, make_engine
from vlrl.train.dist import DistInfo
from vlrl.train.logprobs import build_rows, row_logprobs, rows_logprobs_nograd
from vlrl.train.rl_config import RLConfig, check_config
from vlrl.train.rl_rollout import RolloutSpec, collect, stream_indices, zero_variance
from vlrl.train.rl_update import LossSpec, UpdateBatch, policy_update

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stream_indices_continue_global_batch():
    for step in range(5):
        assert stream_indices(step * 6, 6, 16, seed=3) == global_batch(step, 6, 16, seed=3)
    assert stream_indices(13, 7, 16, seed=3) == [i for s in range(4) for i in global_batch(s, 5, 16, 3)][13:20]


def test_zero_variance_flags():
    nan = float("nan")
    scores = torch.tensor([1, 1, 1, 0, 1, 0, nan, 2, 2, nan, nan, 5], dtype=torch.float64)
    assert zero_variance(scores, 3).tolist() == [True, False, True, True]


class ScriptedEngine:
    """Prompts whose id is in `flat` get G identical right answers; the others one right answer out of G."""

    def __init__(self, flat: set[str]):
        self.flat = flat
        self.calls: list[list[str]] = []

    def generate(self, prompts, n, sampling, *, seeds=None):
        self.calls.append([p.id for p in prompts])
        out = []
        for k, p in enumerate(prompts):
            texts = ["<answer>1</answer>"] * n if p.id in self.flat else [f"<answer>{j + 1}</answer>" for j in range(n)]
            comps = [Completion(torch.tensor([7, 8]), t, torch.zeros(2), truncated=False) for t in texts]
            out.append(Group(p, Encoded(torch.tensor([1, 2]), None, None, None), comps, None if seeds is None else seeds[k]))
        return out

    def sync_weights(self, model):
        pass


def _samples(n: int) -> list[Sample]:
    return [Sample(id=f"s{i}", images=[], messages=[{"role": "user", "content": "q"}], answer="1",
                   problem_type="numerical") for i in range(n)]


def _spec(**kw) -> RolloutSpec:
    base = dict(batch_size=4, group_size=3, sampling=SamplingParams(max_new_tokens=4),
                rewards=[RewardSpec("accuracy")], seed=0, dynamic_sampling=True, dynamic_max_tries=5)
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def test_dynamic_sampling_drops_flat_groups_and_refills():
    samples = _samples(12)
    flat = {f"s{i}" for i in range(6)}
    eng = ScriptedEngine(flat)
    roll, position = collect(eng, samples, _spec(), ONE, position=0)
    assert roll.n_groups == 4 and len(roll.groups) == 4
    assert all(g.sample.id not in flat for g in roll.groups)
    assert roll.gids == [0, 1, 2, 3]
    drawn = sum(len(c) for c in eng.calls)
    assert position == drawn and len(eng.calls) == roll.metrics["dynamic/tries"] > 1
    assert [len(c) for c in eng.calls][0] == 4  # first draw: B prompts; refills draw the shortfall
    order = stream_indices(0, drawn, len(samples), seed=0)
    expected = [f"s{i}" for i in order if f"s{i}" not in flat][:4]
    assert [g.sample.id for g in roll.groups] == expected  # kept in draw order
    n_flat = sum(f"s{i}" in flat for i in order)
    assert roll.metrics["frac_zero_std_groups"] == pytest.approx(n_flat / drawn)
    assert roll.metrics["reward/sampled_mean"] == pytest.approx((n_flat + (drawn - n_flat) / 3) / drawn)
    assert roll.scores.shape == (12,) and roll.per_reward["accuracy"][:3] == [1.0, 0.0, 0.0]


def test_dynamic_sampling_gives_up_after_max_tries():
    samples = _samples(6)
    eng = ScriptedEngine({s.id for s in samples})  # no group ever has signal
    roll, position = collect(eng, samples, _spec(dynamic_max_tries=3), ONE, position=0)
    assert len(eng.calls) == 3 and roll.metrics["dynamic/fallback"] == 1.0
    assert roll.n_groups == len(eng.calls[-1])  # trains on the last draw (zero advantages)
    assert position == sum(len(c) for c in eng.calls)
    partial = ScriptedEngine({f"s{i}" for i in range(5)})  # one prompt in six has signal
    roll, _ = collect(partial, samples, _spec(dynamic_max_tries=2), ONE, position=0)
    assert 0 < roll.n_groups < 4 and roll.metrics["dynamic/fallback"] == 0.0


def test_without_dynamic_sampling_every_group_is_kept():
    eng = ScriptedEngine({"s0", "s1", "s2"})
    roll, position = collect(eng, _samples(8), _spec(dynamic_sampling=False), ONE, position=8)
    assert position == 12 and len(eng.calls) == 1 and roll.n_groups == 4


@pytest.fixture(scope="module")
def rollouts(tiny_model_dir, synth_dir):
    model, processor = load_model_and_processor(tiny_model_dir)
    prompts = load_samples([str(synth_dir / "counting" / "train.jsonl")])[:2]
    groups = make_engine("hf", model, processor).generate(prompts, 3, SamplingParams(max_new_tokens=6, temperature=1.3),
                                                         seeds=[11, 12])
    return model, processor, groups


def test_training_logprobs_match_sampling_logprobs(rollouts):
    model, processor, groups = rollouts
    rows = [(g, j) for g in range(2) for j in range(3)]
    kw = dict(temperature=1.3, suppress_ids=vision_token_ids(processor.tokenizer), device=torch.device("cpu"))
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    shared = rows_logprobs_nograd(model, groups, rows, micro_batch_size=4, pad_id=pad, image_id=img, **kw)
    plain = rows_logprobs_nograd(model, groups, rows, micro_batch_size=6, pad_id=pad, image_id=img,
                                 share_vision=False, **kw)
    for (g, j), a, b in zip(rows, shared, plain):
        assert torch.allclose(a, groups[g].completions[j].logprobs, atol=1e-4)
        assert torch.allclose(a, b, atol=1e-5)
    batch = build_rows(groups, rows, pad, img)
    out = row_logprobs(model, groups, batch, with_entropy=True, **kw)
    assert out.logp.shape == out.mask.shape == out.entropy.shape == batch.completion_ids.shape
    assert out.logp.requires_grad and "pixel_values" not in batch.inputs  # images go in once, as features


def _loss_spec(processor, mode: str, micro: int, loss: str = "ppo_clip") -> LossSpec:
    return LossSpec(loss_fn=POLICY_LOSSES.get(loss), loss_kwargs={}, agg_mode=mode, max_len=6, beta=0.0,
                    kl_estimator="k3", kl_clamp=None, kl_in_loss=False, temperature=1.3,
                    suppress_ids=vision_token_ids(processor.tokenizer), ppo_epochs=1, num_minibatches=1,
                    micro_batch_size=micro, max_grad_norm=1e9, pad_id=processor.tokenizer.pad_token_id,
                    image_id=image_token_id(processor))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_is_independent_of_micro_batching(rollouts, mode):
    model, processor, groups = rollouts
    adv = torch.tensor([1.0, -0.5, 0.2, -1.0, 0.7, 0.3])
    row_mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # one row masked (e.g. truncated)
    batch = UpdateBatch(groups, [0, 1], 2, adv, row_mask, None, None)
    finals, losses = [], []
    for micro, share in ((1, True), (4, True), (6, True), (4, False)):
        m = copy.deepcopy(model).train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        spec = _loss_spec(processor, mode, micro)
        spec.share_vision = share  # vision features shared by a group's rows, or pixels repeated per row
        losses.append(policy_update(m, params, opt, batch, spec, 3, ONE)["loss"])
        finals.append([p.detach() for p in params])
    for other in finals[1:]:
        assert max(float((a - b).abs().max()) for a, b in zip(finals[0], other)) < 1e-5
    # the reported loss is agg_loss over the whole batch (the ratio is 1: loss = -A per token)
    rows = [(g, j) for g in range(2) for j in range(3)]
    rb = build_rows(groups, rows, processor.tokenizer.pad_token_id, image_token_id(processor))
    mask = rb.mask * row_mask[:, None]
    expected = agg_loss(-adv[:, None].expand_as(mask), mask, mode, max_len=6)
    assert losses == pytest.approx([float(expected)] * 4, abs=1e-6)
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(finals[0], (p.detach() for p in model.parameters())))


def test_check_config_rejects_bad_names_and_options(tmp_path):
    base = {"model": "m", "data": ["d"], "out": str(tmp_path)}

    def cfg(**sections: dict) -> RLConfig:
        return build(RLConfig, {**base, **sections})

    assert check_config(cfg(algorithm={"eps_high": 0.28})) == {"eps_high": 0.28}
    with pytest.raises(ValueError, match="valid names"):
        check_config(cfg(algorithm={"loss": "ppo"}))
    with pytest.raises(ValueError, match="algorithm.loss 'gspo' takes no dual_clip"):
        check_config(cfg(algorithm={"loss": "gspo", "dual_clip": 3.0}))
    with pytest.raises(ValueError, match="valid names"):
        check_config(cfg(algorithm={"agg_mode": "mean"}))
    with pytest.raises(ValueError, match="rollout.group_size must be >= 1, got 0"):
        check_config(cfg(rollout={"group_size": 0}))
    with pytest.raises(ConfigError, match="valid: accuracy"):
        cfg(rewards=[{"name": "acuracy"}])
    with pytest.raises(ValueError, match="duplicate reward key 'accuracy'"):  # at start, not at the first step
        check_config(cfg(rewards=[{"name": "accuracy"}, {"name": "accuracy", "weight": 0.5}]))
    with pytest.raises(ValueError, match="replay.coef > 0 needs replay.data"):
        check_config(cfg(replay={"coef": 0.1}))
    with pytest.raises(ValueError, match="replay.coef must be >= 0"):
        check_config(cfg(replay={"coef": -1.0, "data": ["d"]}))
    with pytest.raises(ValueError, match="replay.loss_agg 'mean'; valid: token, sample"):
        check_config(cfg(replay={"coef": 0.1, "data": ["d"], "loss_agg": "mean"}))
    with pytest.raises(ValueError, match="rollout.decode_threads must be >= 1, got 0"):
        check_config(cfg(rollout={"decode_threads": 0}))
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        check_config(cfg(micro_batch_size=0))
    with pytest.raises(ConfigError, match=r"config.rollout: unknown key\(s\) lr"):
        cfg(rollout={"lr": 1e-3})  # a key in the wrong section names the section's own keys


# --- the vllm engine's settings (rollout.vllm) ----------------------------------------------------------------

VLLM_BAD = [
    ("rollout.vllm.startup_timeout=0", "rollout.vllm.startup_timeout"),
    ("rollout.vllm.request_timeout=-1", "rollout.vllm.request_timeout"),
    ("rollout.vllm.retries=-1", "rollout.vllm.retries"),
    ("rollout.vllm.gpu_memory_utilization=0", "rollout.vllm.gpu_memory_utilization"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization"),
    ("rollout.vllm.max_images=0", "rollout.vllm.max_images"),
    ("rollout.vllm.max_model_len=-1", "rollout.vllm.max_model_len"),
    ("rollout.vllm.url=localhost:8100", "rollout.vllm.url"),
    ("rollout.vllm.request_timeout=nan", "rollout.vllm.request_timeout"),
    ("rollout.vllm.port=8100", "port"),
]


def test_rollout_vllm_settings_load_in_part_and_bad_ones_are_refused_at_config_time(tmp_path):
    import re

    from vlrl.config import load_config
    from vlrl.rollout.vllm_engine import VLLMConfig

    base = ["model=m", "data=[d]", f"out={tmp_path / 'run'}"]
    cfg = load_config(RLConfig, None, [*base, "rollout.engine=vllm", "rollout.vllm.url=http://127.0.0.1:8100",
                                       "rollout.vllm.request_timeout=5"])
    assert cfg.rollout.vllm == VLLMConfig(url="http://127.0.0.1:8100", request_timeout=5.0)  # the rest: defaults
    (tmp_path / "c.yaml").write_text("rollout:\n  engine: vllm\n  vllm: {url: 'https://h:1', retries: 0}\n")
    assert load_config(RLConfig, tmp_path / "c.yaml", base).rollout.vllm == VLLMConfig(url="https://h:1", retries=0)
    for override, key in VLLM_BAD:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(RLConfig, None, [*base, override])
    # colocated needs the vLLM environment's Python; a server or the hf engine does not
    nowhere = f"rollout.vllm.python={tmp_path / 'no-env' / 'python'}"
    with pytest.raises(ConfigError, match=r"rollout.vllm.python: no vLLM environment at .*no-env"):
        load_config(RLConfig, None, [*base, "rollout.engine=vllm", nowhere])
    load_config(RLConfig, None, [*base, "rollout.engine=vllm", nowhere, "rollout.vllm.url=http://127.0.0.1:8100"])
    load_config(RLConfig, None, [*base, "rollout.engine=hf", nowhere])


def test_cli_refuses_a_missing_vllm_environment_with_exit_2_before_writing(tmp_path, capsys):
    from vlrl.cli import main

    out = tmp_path / "run"
    code = main(["rl", f"model={tmp_path / 'nomodel'}", "data=[d]", f"out={out}", "rollout.engine=vllm",
                 f"rollout.vllm.python={tmp_path / 'no-env' / 'python'}"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "rollout.vllm.python" in err and "make vllm-env" in err
    assert not out.exists()


def test_a_vllm_server_is_refused_under_several_ranks_before_the_run_dir_is_touched(tmp_path, monkeypatch):
    from vlrl.config import load_config
    from vlrl.train import rl
    from vlrl.train.rl_config import check_world

    out = tmp_path / "run"
    base = [f"model={tmp_path / 'nomodel'}", "data=[d]", f"out={out}", "rollout.engine=vllm"]
    server = load_config(RLConfig, None, [*base, "rollout.vllm.url=http://127.0.0.1:8100"])
    colocated = load_config(RLConfig, None, [*base, f"rollout.vllm.python={sys.executable}"])
    check_world(server, 1)
    check_world(colocated, 2)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(rl, "init_distributed", lambda **kw: two)
    with pytest.raises(ConfigError, match=r"rollout.vllm.url 'http://127.0.0.1:8100' with 2 ranks"):
        rl.run_rl(server)
    assert not out.exists()


class _Closing:
    """A real `hf` engine that counts its `close` calls, standing in for the engine `make_engine` was asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.closed = inner, 0

    def generate(self, *args: Any, **kwargs: Any) -> list[Group]:
        return self.inner.generate(*args, **kwargs)

    def sync_weights(self, model: Any) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.closed += 1


@pytest.mark.slow
def test_run_rl_passes_rollout_vllm_to_its_engine_and_closes_it_at_the_end_or_on_an_interrupt(
        tiny_model_dir, synth_dir, tmp_path, monkeypatch):  # fmt: skip
    from vlrl.config import load_config
    from vlrl.train import rl

    made: list[tuple[str, dict[str, Any], _Closing]] = []

    def fake_make_engine(name: str, model: Any, processor: Any, **kwargs: Any) -> _Closing:
        engine = _Closing(make_engine("hf", model, processor))
        made.append((name, kwargs, engine))
        return engine

    monkeypatch.setattr(rl, "make_engine", fake_make_engine)

    def cfg(out: Path) -> RLConfig:
        return load_config(RLConfig, None, [
            f"model={tiny_model_dir}", f"data=[{synth_dir / 'counting' / 'train.jsonl'}]", f"out={out}", "max_steps=2",
            "rollout.batch_size=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "rollout.engine=vllm",
            "rollout.max_prompts_per_call=1", "rollout.vllm.url=http://127.0.0.1:8100", "rollout.vllm.retries=0",
            "logging.save_every=0"])  # fmt: skip

    done = cfg(tmp_path / "done")
    rl.run_rl(done)
    ((name, kwargs, engine),) = made
    assert name == "vllm" and kwargs["config"] == done.rollout.vllm and kwargs["max_prompts_per_call"] == 1
    assert "decode_threads" not in kwargs  # an hf-only setting
    assert engine.closed == 1

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(rl, "policy_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.run_rl(cfg(tmp_path / "interrupted"))
    assert len(made) == 2 and made[1][2].closed == 1
