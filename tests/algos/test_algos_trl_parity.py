"""Parity with TRL 1.16: our advantages and losses against TRL's own trainer code on the same tensors.

How TRL is driven (no TRL formula is re-typed here):
- Advantages: `GRPOTrainer._generate_and_score_completions` (and `RLOOTrainer`'s) runs unmodified on an
  instance made with `object.__new__` (no `__init__`, no model, no accelerate state). Only the instance gets
  stubs: `_generate` returns fixed token ids, `_calculate_rewards` returns our reward column (NaN = an
  unscorable completion), RLOO's `_get_per_token_logps_and_entropies` returns our policy / reference
  log-probs, and the accelerator is a single-process stand-in (gather = identity). The method's returned
  `advantages` are compared with ours.
- Losses: `GRPOTrainer._compute_loss(model, inputs)` runs unmodified on such an instance with the attributes
  it reads set (loss_type, epsilon_low/high, beta, importance_sampling_level, max_completion_length, ...);
  the instance's `_get_per_token_logps_and_entropies` returns our float64 leaf tensor `logp`, so TRL's loss
  and ours are functions of the same leaf: values and `logp.grad` are compared, plus TRL's logged clip
  ratios and KL.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")

from vlrl.algos import (  # noqa: E402
    POLICY_LOSSES,
    add_kl_to_loss,
    agg_loss,
    dr_grpo,
    grpo,
    kl_penalized_rewards,
    rloo,
)

TOL = 1e-6
DT = torch.float64


class _Accelerator:
    """Single-process stand-in for `accelerate.Accelerator`: every collective is the identity."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True
    device = torch.device("cpu")

    def gather(self, x: Any) -> Any:
        return x

    def gather_for_metrics(self, x: Any) -> Any:
        return x

    def reduce(self, x: Any, reduction: str = "sum") -> Any:
        return x


class _Model(torch.nn.Module):
    is_gradient_checkpointing = False


def _bare(cls: type) -> Any:
    """A trainer instance without `__init__`, with the bookkeeping attributes every method touches."""
    t: Any = object.__new__(cls)
    t.accelerator = _Accelerator()
    t.model = _Model()  # .training is True -> "train" mode
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def _prepare_scoring(t: Any, rewards: torch.Tensor, group_size: int) -> None:
    """Set what `_generate_and_score_completions` reads, with the reward functions stubbed."""
    n = rewards.numel()
    t.environment_factories = None
    t.tools = None
    t.environments = None
    t._tokenizer = types.SimpleNamespace(pad_token_id=0)
    t.pad_to_multiple_of = None
    t.mask_truncated_completions = False
    t.args = types.SimpleNamespace(
        per_device_train_batch_size=n,
        gradient_checkpointing_kwargs=None,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
    )
    t.num_iterations = 1
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.num_generations = group_size
    t.reward_weights = torch.ones(1, dtype=DT)
    t.reward_func_names = ["r"]
    t._calculate_rewards = lambda inputs, prompts, completions, ids: rewards.unsqueeze(1).clone()
    t._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }
    t._pending_extra_logs = {}
    t._pending_metrics = {}
    t.log_multimodal = False


def trl_grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> tuple[torch.Tensor, dict]:
    n = rewards.numel()
    t = _bare(trl_grpo.GRPOTrainer)
    _prepare_scoring(t, rewards, group_size)
    completion_ids = [[7, 7, 7]] * n  # stub generation: (prompt ids, completion ids, tool mask, texts, ...)
    t._generate = lambda prompts: ([[1, 2]] * n, completion_ids, None, ["c"] * n, None, {}, None, None)
    t.beta = 0.0
    t.multi_objective_aggregation = "sum_then_normalize"
    t.scale_rewards = scale
    out = t._generate_and_score_completions([{"prompt": "p"}] * n)
    return out["advantages"], t._metrics["train"]


def trl_rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    beta: float = 0.0,
    logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    n = rewards.numel()
    t = _bare(trl_rloo.RLOOTrainer)
    _prepare_scoring(t, rewards, group_size)
    completion_ids = [[7] * k for k in (lengths or [3] * n)]  # ragged: TRL pads and masks them
    t._generate = lambda prompts: ([[1, 2]] * n, completion_ids, ["c"] * n)
    t.beta = beta
    t.ref_model = object()
    t.reward_clip_range = None
    t.normalize_advantages = False
    policy, ref = logps if logps is not None else (torch.zeros(n, 3, dtype=DT),) * 2

    def per_token_logps(
        model: Any, ids: torch.Tensor, am: torch.Tensor, keep: int, *a: Any, **k: Any
    ) -> tuple:
        return (ref if model is t.ref_model else policy)[:, :keep], None, None

    t._get_per_token_logps_and_entropies = per_token_logps
    return t._generate_and_score_completions([{"prompt": "p"}] * n)["advantages"]


def _random_rewards(gen: torch.Generator, n_groups: int, group_size: int) -> torch.Tensor:
    """Binary, continuous and tied groups, plus one unscorable (NaN) completion."""
    binary = (torch.rand(n_groups // 2 * group_size, generator=gen) > 0.5).to(DT)
    cont = torch.rand((n_groups - n_groups // 2) * group_size, generator=gen, dtype=DT) * 3 - 1
    r = torch.cat([binary, cont])
    r[:group_size] = 1.0  # an all-right group: zero std
    r[-1] = float("nan")
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_grpo_advantages_equal_trl(scale: str, group_size: int) -> None:
    gen = torch.Generator().manual_seed(group_size)
    rewards = _random_rewards(gen, 6, group_size)
    expected, trl_metrics = trl_grpo_advantages(rewards, group_size, scale)
    ours, metrics = grpo(rewards, group_size, scale=scale)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    if scale != "batch":  # TRL measures the batch std there; we always report the per-group fraction
        assert metrics["frac_zero_std_groups"] == pytest.approx(trl_metrics["frac_reward_zero_std"][0])
    if scale == "none":
        torch.testing.assert_close(dr_grpo(rewards, group_size)[0], expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("group_size", [2, 5])
def test_rloo_advantages_equal_trl(group_size: int) -> None:
    rewards = _random_rewards(torch.Generator().manual_seed(7), 4, group_size)
    torch.testing.assert_close(
        rloo(rewards, group_size)[0], trl_rloo_advantages(rewards, group_size), atol=TOL, rtol=0
    )


def test_rloo_with_reward_kl_equals_trl() -> None:
    """TRL's RLOO subtracts beta * sum_t (logp - ref_logp) from the reward: our k1 `kl_penalized_rewards`."""
    gen = torch.Generator().manual_seed(3)
    n, t_max, group_size, beta = 6, 5, 3, 0.05
    lengths = [5, 2, 4, 1, 3, 5]
    rewards = (torch.rand(n, generator=gen) > 0.5).to(DT)
    policy = -torch.rand(n, t_max, generator=gen, dtype=DT)
    ref = -torch.rand(n, t_max, generator=gen, dtype=DT)
    mask = (torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]).to(DT)
    expected = trl_rloo_advantages(rewards, group_size, beta=beta, logps=(policy, ref), lengths=lengths)
    penalized, _ = kl_penalized_rewards(rewards, policy, ref, mask, beta=beta, estimator="k1")
    torch.testing.assert_close(rloo(penalized, group_size)[0], expected, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------- losses


def _loss_case(seed: int, n: int = 12, t_max: int = 8) -> dict[str, torch.Tensor]:
    """Random per-token log-probs, half the rows with log-ratio scale ~1e-4..3e-3 (GSPO's clip range), half
    ~0.2..1 (PPO's), with ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t_max, generator=gen, dtype=DT) * 3
    scales = torch.cat(
        [torch.logspace(-4, -2.5, n // 2, dtype=DT), torch.linspace(0.2, 1.0, n - n // 2, dtype=DT)]
    )
    spread = scales[torch.randperm(n, generator=gen)].unsqueeze(1)  # [N, 1]
    noise = torch.randn(n, t_max, generator=gen, dtype=DT) + 2 * torch.randn(n, 1, generator=gen, dtype=DT)
    old = logp + spread * noise  # a per-row shift too, so sequence-level ratios leave the clip range
    ref = logp + 0.3 * torch.randn(n, t_max, generator=gen, dtype=DT)
    lengths = torch.randint(1, t_max + 1, (n,), generator=gen)
    lengths[0] = t_max
    mask = (torch.arange(t_max)[None, :] < lengths[:, None]).long()  # [N, T], right padding
    adv = torch.randn(n, generator=gen, dtype=DT)
    return {"logp": logp, "old": old, "ref": ref, "mask": mask, "adv": adv}


def trl_loss(
    case: dict[str, torch.Tensor],
    *,
    loss_type: str,
    level: str,
    beta: float,
    eps_low: float,
    eps_high: float,
    max_len: int,
    num_items: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """TRL's `_compute_loss` on `case`; returns (loss, d loss / d logp, TRL's logged metrics)."""
    t = _bare(trl_grpo.GRPOTrainer)
    t.loss_type = loss_type
    t.importance_sampling_level = level
    t.beta = beta
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.max_completion_length = max_len
    t.top_entropy_quantile = 1.0
    t.aux_loss_enabled = False
    t.off_policy_mask_threshold = None
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.current_gradient_accumulation_steps = 1
    t._entropy_bonus_enabled = False
    t.args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    leaf = case["logp"].clone().requires_grad_(True)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
    n, t_max = leaf.shape
    mask = case["mask"]
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, t_max, dtype=torch.long),
        "completion_mask": mask,
        "advantages": case["adv"],
        "old_per_token_logps": case["old"],
        "ref_per_token_logps": case["ref"],
        "num_items_in_batch": torch.tensor(float(num_items if num_items is not None else mask.sum())),
    }
    loss = t._compute_loss(None, inputs)
    loss.backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad, {k: v[0] for k, v in t._metrics["train"].items()}


def ours_loss(
    case: dict[str, torch.Tensor],
    *,
    loss: str,
    mode: str,
    beta: float,
    eps_low: float,
    eps_high: float,
    max_len: int,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaf = case["logp"].clone().requires_grad_(True)
    loss_mat, metrics = POLICY_LOSSES.get(loss)(
        leaf, case["old"], case["adv"], case["mask"], eps_low=eps_low, eps_high=eps_high
    )
    if beta:
        loss_mat, kl_metrics = add_kl_to_loss(loss_mat, leaf, case["ref"], case["mask"], beta=beta)
        metrics.update(kl_metrics)
    value = agg_loss(loss_mat, case["mask"], mode, max_len=max_len, num_tokens=num_tokens)
    value.backward()
    assert leaf.grad is not None
    return value.detach(), leaf.grad, metrics


# (TRL loss_type, TRL importance_sampling_level, our loss, our agg mode, eps_low, eps_high)
LOSS_CASES = [
    ("grpo", "token", "ppo_clip", "seq-mean-token-mean", 0.2, 0.2),
    ("bnpo", "token", "ppo_clip", "token-mean", 0.2, 0.2),
    ("dapo", "token", "ppo_clip", "token-mean", 0.2, 0.28),
    ("dr_grpo", "token", "ppo_clip", "seq-mean-token-sum-norm", 0.2, 0.2),
    ("grpo", "sequence", "gspo", "seq-mean-token-mean", 3e-4, 4e-4),
    ("grpo", "sequence", "gspo_token", "seq-mean-token-mean", 3e-4, 4e-4),
    ("grpo", "sequence", "gspo", "seq-mean-token-mean", 0.2, 0.28),
    ("luspo", "sequence", "gspo", "seq-mean-token-sum", 3e-4, 4e-4),
]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("loss_type", "level", "loss", "mode", "eps_low", "eps_high"), LOSS_CASES)
def test_loss_and_grad_equal_trl(
    loss_type: str, level: str, loss: str, mode: str, eps_low: float, eps_high: float, beta: float
) -> None:
    case = _loss_case(seed=len(loss_type) + len(loss) + int(beta * 100))
    max_len = 11  # > T: TRL's dr_grpo divides by the configured max, not the padded length
    common: dict[str, Any] = {"beta": beta, "eps_low": eps_low, "eps_high": eps_high, "max_len": max_len}
    trl_value, trl_grad, trl_metrics = trl_loss(case, loss_type=loss_type, level=level, **common)
    value, grad, metrics = ours_loss(case, loss=loss, mode=mode, **common)
    torch.testing.assert_close(value, trl_value, atol=TOL, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=TOL, rtol=0)
    assert trl_grad.abs().sum() > 0  # not vacuous: gradients flow, and both clipped and unclipped terms occur
    assert 0.0 < trl_metrics["clip_ratio/region_mean"] < 1.0
    if loss != "gspo_token":  # gspo_token reports token-weighted clip fractions, TRL sequence-weighted
        for side in ("low", "high", "region"):
            assert metrics[f"clip_frac/{side}"] == pytest.approx(
                trl_metrics[f"clip_ratio/{side}_mean"], abs=1e-6
            )
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-9)


def test_dapo_global_token_normaliser_equals_trl() -> None:
    """TRL's "dapo" divides by the generation batch's token count (`num_items_in_batch`): our `num_tokens`."""
    case = _loss_case(seed=11)
    num_items = float(case["mask"].sum()) * 3  # as if this micro-batch were one third of the batch
    common: dict[str, Any] = {"beta": 0.0, "eps_low": 0.2, "eps_high": 0.28, "max_len": 11}
    trl_value, trl_grad, _ = trl_loss(case, loss_type="dapo", level="token", num_items=num_items, **common)
    value, grad, _ = ours_loss(case, loss="ppo_clip", mode="token-mean", num_tokens=num_items, **common)
    torch.testing.assert_close(value, trl_value, atol=TOL, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=TOL, rtol=0)


def test_gspo_token_matches_gspo_value_and_gradient() -> None:
    """GSPO paper, section 4.3: with A_{i,t} = A_i, GSPO-token equals GSPO in value and gradient."""
    case = _loss_case(seed=5)
    common: dict[str, Any] = {
        "beta": 0.0,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "max_len": 11,
        "mode": "seq-mean-token-mean",
    }
    v1, g1, _ = ours_loss(case, loss="gspo", **common)
    v2, g2, _ = ours_loss(case, loss="gspo_token", **common)
    torch.testing.assert_close(v1, v2, atol=1e-12, rtol=0)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
