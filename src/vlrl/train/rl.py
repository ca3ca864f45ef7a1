"""RL fine-tuning with group-sampled, verifiable rewards: GRPO, GSPO, DAPO, Dr.GRPO, Trust-GRPO
(`vlrl rl --config ...`).

One step is one short loop, each stage timed (`time/<stage>` in metrics.jsonl):

    rollout    B prompts x G completions (rollout engine; DAPO dynamic sampling refills zero-variance groups)
    reward     weighted sum of registered rewards (`rewards:` in the config)
    judge      Trust-GRPO only (`trust.enabled`, `train/trust.py`): an LLM judge's process rewards for
               the groups neither all right nor all wrong; R + gamma * alpha * exp(-step / T) * R_process
    ref_logp   frozen reference model's log-probs (only when algorithm.beta > 0)
    old_logp   the sampling policy's log-probs (only when needed: several epochs / minibatches, KL in reward)
    advantage  `ADVANTAGES[algorithm.advantage]` over the global batch
    update     (replay.coef > 0: first the backward of replay.coef x the SFT loss of a batch of replay.data,
               PPO-ptx) ppo_epochs x num_minibatches optimizer steps of `POLICY_LOSSES[algorithm.loss]`
               (+ beta * KL), reduced by `agg_loss(algorithm.agg_mode)`, gradients summed over ranks, clipped
    log        metrics.jsonl (every `logging.log_every` steps), samples.jsonl (some rollouts and their rewards)

The configuration (`RLConfig`, sections rollout / algorithm / optim / replay / trust / logging / validation)
is in `vlrl.train.rl_config`.

Groups stay whole on one rank; prompts are seeded by their data position, so a step does the same update
on any world size, and re-running the same command resumes from the newest complete checkpoint with the
same completions (the checkpoint also restores the torch RNG).

metrics.jsonl, one line per logged step (all values global over ranks):
  step, elapsed_s, lr (the rate this step's updates used)
  time/rollout, time/reward, time/ref_logp, time/old_logp, time/advantage, time/update, time/step (s);
      time/eval on evaluation steps (not part of time/step)
  reward/mean, reward/std      total weighted reward over the trained rows (population std)
  reward/{key}                 each reward's mean over the rows it could score; reward/unscored: rows none could
  reward/sampled_mean          mean total reward over every row sampled this step (before dynamic sampling)
  adv/mean, adv/std, adv/min, adv/max, adv/frac_zero_std_groups   over the trained batch
  frac_zero_std_groups         over every group sampled this step (before dynamic sampling drops any)
  dynamic/tries, dynamic/prompts, dynamic/kept_groups, dynamic/fallback (1: no group had signal)
  data/skipped_images          samples whose image no longer loaded, replaced by the next good one (skip_invalid)
  completion/len_mean, completion/len_max, completion/truncated_frac   (tokens, stop token included)
  sft_replay/loss              SFT loss of the step's replayed demonstrations (replay.coef > 0; before scaling)
  loss (mean over the step's optimizer updates; without the replay term), grad_norm (mean, before clipping), updates
  skipped_nonfinite            updates skipped since the previous line for a loss or gradient norm that is not finite
                               (no optimizer step); skipped_nonfinite_total: over the run (see `nonfinite_limit`)
  entropy (token mean, first epoch), kl (beta > 0), approx_kl, clip_frac/{low,high,region,dual}, ratio/mean
  rollout/logp_diff            mean |old log-prob - engine's sampling log-prob| per token: ~1e-6 when top-k /
                               top-p are off (a train / inference mismatch check); larger by design when on
  val_accuracy, val_accuracy/{task}   on evaluation steps
  with trust.enabled (reward/* above are the outcome rewards, before the process term):
  time/judge; trust/weight (alpha * exp(-step / T) for this line's step), trust/gamma_mean (over groups with a
      process reward; 1.0 if none), trust/frac_gamma_lt_1, trust/frac_groups_sent (groups sent to the judge),
      trust/frac_groups_judged (groups that got at least one process reward), trust/judge_requests
      (completions sent), trust/judge_calls (HTTP requests, retries included), trust/cache_hits,
      trust/judge_failures (sent completions left without a process reward) = trust/judge_no_reply (call
      failed after retries, or image unusable) + trust/judge_unparsable; trust/judge_no_reply by cause:
      trust/judge_{timeouts,http_errors,connection_errors,malformed,over_deadline,image_errors,errors};
      trust/judge_retries (repeated attempts), trust/process_mean, trust/reward_mean (the mixed reward)
samples.jsonl: the first `logging.log_samples` rows of each logged step: step, row, id, images (the sample's image
paths), prompt (the last user message's text), answer, completion, reward, advantage, reward/{key} (and
reward/trust_process with Trust-GRPO), length, truncated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlrl.algos import ADVANTAGES, POLICY_LOSSES, kl_penalized_rewards
from vlrl.data.loading import load_samples
from vlrl.data.order import global_batch
from vlrl.eval.evaluate import EvalResult, close_engine, evaluate_samples
from vlrl.models.loading import load_model
from vlrl.models.processor import image_token_id, vision_token_ids
from vlrl.rewards.registry import RewardSpec
from vlrl.rewards.runner import RewardRunner
from vlrl.rollout.base import RolloutEngine, make_engine
from vlrl.train.dist import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, is_distributed
from vlrl.train.harness import RL_PROGRESS, RunHarness, Schedule, format_of
from vlrl.train.logprobs import rows_logprobs_nograd
from vlrl.train.optim import make_optimizer, make_scheduler, set_trainable
from vlrl.train.parallel import autocast_here, full_weights, wrap
from vlrl.train.policy import load_policy
from vlrl.train.precision import precision_of
from vlrl.train.rl_config import RLConfig, check_config, check_world
from vlrl.train.rl_rollout import RolloutSpec, StepRollouts, all_reduce_max, collect, gather_rows
from vlrl.train.rl_update import LossSpec, UpdateBatch, policy_update
from vlrl.train.rundir import RL_FREE_KEYS, hold_run_dir, record_run_config
from vlrl.train.sft import check_ranks, sft_backward
from vlrl.train.trust import TrustStage


@dataclass
class RLRun:
    """Everything a step needs: model(s), engine, optimizer, data, and the stage specs."""

    cfg: RLConfig
    info: DistInfo
    model: Any
    ref: Any
    processor: Any
    engine: RolloutEngine
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    samples: list
    rollout: RolloutSpec
    loss: LossSpec
    trust: TrustStage | None = None  # Trust-GRPO's judge stage (trust.enabled)
    replay: list | None = None  # demonstrations replayed with sft_coef (None: off)
    adapters: Any = None  # LoRA: the peft model around `model` (checkpoints; the reference = adapters disabled)
    root: Any = None  # `model` wrapped for training (`vlrl.train.parallel`: DDP, FSDP2 or none)
    engine_stale: bool = False  # the weights changed since the engine last took them

    @property
    def to_save(self) -> Any:
        return self.adapters if self.adapters is not None else self.model


def _timed(metrics: dict[str, float], key: str, t0: float) -> None:
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0


def prepare_update(run: RLRun, roll: StepRollouts, metrics: dict[str, float]) -> UpdateBatch:
    """ref / old log-probs, KL-in-reward, advantages over the global batch, the truncation mask."""
    cfg, G = run.cfg, run.cfg.rollout.group_size
    rows = [(li, j) for li in range(len(roll.groups)) for j in range(G)]
    kw: dict[str, Any] = dict(micro_batch_size=cfg.micro_batch_size, temperature=cfg.rollout.temperature,
                              suppress_ids=run.loss.suppress_ids, device=run.info.device, pad_id=run.loss.pad_id,
                              image_id=run.loss.image_id, share_vision=cfg.share_vision,
                              shared_prefix=cfg.shared_prefix, chunk_tokens=cfg.logprob_chunk_tokens,
                              spare=roll.spare)
    t = time.perf_counter()
    ref = None
    if run.ref is not None:
        ref = rows_logprobs_nograd(run.ref, roll.groups, rows, **kw)
    elif run.adapters is not None and cfg.algorithm.beta > 0:  # LoRA: the reference is the base model
        with run.adapters.disable_adapter():
            ref = rows_logprobs_nograd(run.root, roll.groups, rows, **kw)
    _timed(metrics, "time/ref_logp", t)
    t = time.perf_counter()
    old = rows_logprobs_nograd(run.root, roll.groups, rows, **kw) if cfg.needs_old_logp else None
    _timed(metrics, "time/old_logp", t)
    scores = roll.scores  # [n_local * G]
    if cfg.algorithm.kl_in_reward and ref is not None and old is not None:
        scores = _kl_penalty(cfg, scores, old, ref, metrics)
    rewards = gather_rows(scores, roll.gids, roll.n_groups, G)  # [B * G], every rank's rows
    t = time.perf_counter()
    estimator = ADVANTAGES.get(cfg.algorithm.advantage)
    adv_all, m_adv = estimator(rewards, G, **cfg.algorithm.advantage_kwargs)  # [B * G]
    _timed(metrics, "time/advantage", t)
    m_adv["adv/frac_zero_std_groups"] = m_adv.pop("frac_zero_std_groups")  # of the trained batch
    metrics.update(m_adv)
    mine = torch.tensor([gid * G + j for gid in roll.gids for j in range(G)], dtype=torch.long)  # [n_local * G]
    adv = adv_all[mine].float() if len(mine) else torch.zeros(0)
    truncated = torch.tensor([c.truncated for g in roll.groups for c in g.completions], dtype=torch.bool)
    row_mask = (~truncated).float() if cfg.algorithm.mask_truncated else torch.ones(len(rows))
    return UpdateBatch(roll.groups, roll.gids, roll.n_groups, adv, row_mask, old, ref, roll.spare)


def _kl_penalty(cfg: RLConfig, scores: torch.Tensor, old: list[torch.Tensor], ref: list[torch.Tensor],
                metrics: dict[str, float]) -> torch.Tensor:
    """scores - beta * sum_t KL_t per row (KL of the sampling policy to the reference, no gradient)."""
    lengths = torch.tensor([len(x) for x in old])  # [n]
    if not len(old):
        metrics["kl"] = _global_mean(0.0, 0.0)
        return scores
    lp = torch.nn.utils.rnn.pad_sequence(old, batch_first=True).double()  # [n, T]
    rp = torch.nn.utils.rnn.pad_sequence(ref, batch_first=True).double()  # [n, T]
    mask = (torch.arange(lp.shape[1])[None] < lengths[:, None]).double()  # [n, T]
    a = cfg.algorithm
    penalized, m_kl = kl_penalized_rewards(scores, lp, rp, mask, beta=a.beta, estimator=a.kl_estimator or "k1",
                                           clamp=a.kl_clamp)
    metrics["kl"] = _global_mean(m_kl["kl"] * float(mask.sum()), float(mask.sum()))
    return penalized


def _global_mean(total: float, count: float) -> float:
    t = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
    return float(t[0] / max(1.0, float(t[1])))


def rollout_metrics(roll: StepRollouts, specs: list[RewardSpec]) -> dict[str, float]:
    """Reward mean / std and each reward's mean over the step's (kept) rows; completion lengths. Global."""
    s = roll.scores[~torch.isnan(roll.scores)]
    lengths = [c.length for g in roll.groups for c in g.completions]
    sums = [float(s.sum()), float((s**2).sum()), float(s.numel()), float(sum(lengths)), float(len(lengths)),
            float(sum(c.truncated for g in roll.groups for c in g.completions))]
    for spec in specs:
        vals = [v for v in roll.per_reward[spec.key] if v is not None]
        sums += [float(sum(vals)), float(len(vals))]
    t = all_reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    n = max(1.0, t[2])
    mean = t[0] / n
    out = {"reward/mean": mean, "reward/std": max(0.0, t[1] / n - mean * mean) ** 0.5,
           "completion/len_mean": t[3] / max(1.0, t[4]), "completion/truncated_frac": t[5] / max(1.0, t[4]),
           "completion/len_max": float(all_reduce_max(torch.tensor(float(max(lengths, default=0))))),
           "reward/unscored": t[4] - t[2]}
    for i, spec in enumerate(specs):
        out[f"reward/{spec.key}"] = t[6 + 2 * i] / max(1.0, t[7 + 2 * i])
    return out


def sample_records(step: int, roll: StepRollouts, batch: UpdateBatch, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of the step's global batch (gathered from every rank), for samples.jsonl."""
    out: list[dict[str, Any]] = []
    G = len(roll.groups[0].completions) if roll.groups else 0
    for li, (gid, group) in enumerate(zip(roll.gids, roll.groups)):
        users = [m["content"] for m in group.sample.messages if m.get("role") == "user"]
        for j, c in enumerate(group.completions[: max(0, limit - len(out))]):
            r = li * G + j
            out.append({"step": step, "row": gid * G + j, "id": group.sample.id,
                        "images": [str(p) for p in group.sample.images], "prompt": users[-1] if users else "",
                        "answer": group.sample.answer, "completion": c.text, "reward": float(roll.scores[r]),
                        "advantage": float(batch.advantages[r]),
                        **{f"reward/{k}": v[r] for k, v in roll.per_reward.items()},
                        "length": c.length, "truncated": c.truncated})
    if is_distributed():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        out = [rec for part in parts for rec in part]
    return sorted(out, key=lambda rec: rec["row"])[:limit]


def rl_step(run: RLRun, step: int, position: int) -> tuple[dict[str, float], list[dict[str, Any]], int]:
    """One RL step from data position `position`: returns (metrics, sample rows, next position)."""
    t_step = time.perf_counter()
    with full_weights(run.root) as model:  # under FSDP2 the engine samples from gathered weights
        if run.engine_stale:
            run.engine.sync_weights(model)
            run.engine_stale = False
        roll, position = collect(run.engine, run.samples, run.rollout, run.info, position)
    metrics: dict[str, float] = dict(roll.metrics)
    metrics.update(rollout_metrics(roll, run.cfg.rewards))
    if run.trust is not None:  # the step number metrics.jsonl logs (1-based) sets the annealed weight
        metrics.update(run.trust.apply(roll, step + 1))
    with autocast_here(run.root, precision_of(run.cfg.dtype), run.info.device):  # the forwards, not the optimizer
        batch = prepare_update(run, roll, metrics)
        t = time.perf_counter()
        metrics["lr"] = run.sched.get_last_lr()[0]  # the rate this step's updates use
        if run.replay is not None:  # its gradient joins the step's first optimizer update
            metrics.update(replay_backward(run, step))
        metrics.update(policy_update(run.root, run.params, run.opt, batch, run.loss, run.cfg.rollout.group_size,
                                     run.info))
    run.sched.step()
    run.engine_stale = True  # synced before the next rollout
    _timed(metrics, "time/update", t)
    metrics["time/step"] = time.perf_counter() - t_step
    return metrics, sample_records(step + 1, roll, batch, run.cfg.logging.log_samples), position


def replay_backward(run: RLRun, step: int) -> dict[str, float]:
    """Backward of sft_coef x the SFT loss of demonstration batch `step` (the same indices on any world size
    and after a resume: `global_batch` depends on the step only); gradients are reduced with the RL loss's."""
    assert run.replay is not None
    cfg = run.cfg
    indices = global_batch(step, cfg.replay.batch_size, len(run.replay), cfg.seed)
    stats = sft_backward(run.root, run.processor, run.replay, indices, cfg.replay.loss_agg, cfg.micro_batch_size,
                         run.info, scale=cfg.replay.coef, sync=False)  # summed with the first update's gradient
    return {"sft_replay/loss": stats["loss"]}


def _load_ref(cfg: RLConfig, info: DistInfo) -> Any:
    """The frozen KL reference: none without a KL term, nor under LoRA without its own `ref_model` (then the
    policy with its adapters disabled is the reference)."""
    if cfg.algorithm.beta <= 0 or (cfg.lora.enabled and cfg.ref_model is None):
        return None
    ref: Any = load_model(cfg.ref_model or cfg.model, precision_of(cfg.dtype).compute_dtype)  # no master weights
    ref.to(info.device).eval()
    ref.requires_grad_(False)
    # sharded like the policy under fsdp; whole on every rank otherwise (no gradients: nothing for DDP to do)
    return wrap(ref, "fsdp" if cfg.parallel == "fsdp" else "none", info, precision_of("float32"))


def build_run(cfg: RLConfig, info: DistInfo, start_from: str) -> RLRun:
    loss_kwargs = check_config(cfg)
    r, a, o = cfg.rollout, cfg.algorithm, cfg.optim
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.model, start_from, start_from != cfg.model, precision_of(cfg.dtype).param_dtype,
                         cfg.lora, cfg.min_pixels, cfg.max_pixels)
    model: Any = policy.model
    processor = policy.processor
    model.to(info.device).train()
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if not cfg.lora.enabled:  # under LoRA the adapters only (optim.freeze_* do not apply: the base is frozen whole)
        set_trainable(model, "full", freeze_vision=o.freeze_vision, freeze_merger=o.freeze_merger)
    root = wrap(model, cfg.parallel, info, precision_of(cfg.dtype), cpu_offload=cfg.cpu_offload)
    params = [p for p in root.parameters() if p.requires_grad]  # (sharded under fsdp)
    opt = make_optimizer(params, o.lr, o.weight_decay, betas=(o.adam_betas[0], o.adam_betas[1]))
    sched = make_scheduler(opt, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
    samples = load_samples(cfg.data, registry=cfg.registry, template=cfg.template, skip_invalid=cfg.skip_invalid,
                           system_prompt=cfg.system_prompt)
    runner = RewardRunner(workers=r.reward_workers, timeout=r.reward_timeout) if r.reward_workers > 0 else None
    rollout = RolloutSpec(batch_size=r.batch_size, group_size=r.group_size, sampling=cfg.sampling,
                          rewards=list(cfg.rewards), seed=cfg.seed, dynamic_sampling=r.dynamic_sampling,
                          dynamic_max_tries=r.dynamic_max_tries, runner=runner,
                          skip_invalid=cfg.skip_invalid)
    tok = processor.tokenizer
    loss = LossSpec(
        loss_fn=POLICY_LOSSES.get(a.loss), loss_kwargs=loss_kwargs, agg_mode=a.agg_mode, max_len=r.max_new_tokens,
        beta=a.beta, kl_estimator=a.kl_estimator or "k3", kl_clamp=a.kl_clamp,
        kl_in_loss=a.beta > 0 and not a.kl_in_reward, temperature=r.temperature, suppress_ids=vision_token_ids(tok),
        ppo_epochs=a.ppo_epochs, num_minibatches=a.num_minibatches, micro_batch_size=cfg.micro_batch_size,
        max_grad_norm=o.max_grad_norm, pad_id=int(tok.pad_token_id), image_id=image_token_id(processor),
        share_vision=cfg.share_vision, shared_prefix=cfg.shared_prefix, chunk_tokens=cfg.logprob_chunk_tokens,
    )  # fmt: skip
    trust = TrustStage(cfg.trust, r.group_size) if cfg.trust.enabled else None
    replay = None
    if cfg.replay.coef > 0:
        replay = load_samples(cfg.replay.data, registry=cfg.registry, template=cfg.template,
                              skip_invalid=cfg.skip_invalid, system_prompt=cfg.system_prompt)
    ref = _load_ref(cfg, info)
    engine_kw: dict[str, Any] = {"max_prompts_per_call": r.max_prompts_per_call}
    if r.engine == "hf":
        engine_kw["decode_threads"] = r.decode_threads
    elif r.engine == "vllm":
        engine_kw["config"] = r.vllm
    # made last: a vllm engine starts a worker process, which nothing that can still fail above should leave behind
    with full_weights(root) as whole:
        engine = make_engine(r.engine, whole, processor, device=info.device, **engine_kw)
    return RLRun(cfg, info, model, ref, processor, engine, params, opt, sched, samples, rollout, loss, trust, replay,
                 policy.adapters, root)


def schedule(cfg: RLConfig) -> Schedule:
    """When the run stops, validates, logs and saves."""
    log = cfg.logging
    return Schedule(max_steps=cfg.max_steps, max_seconds=cfg.max_seconds, save_every=log.save_every,
                    keep_checkpoints=log.keep_checkpoints, log_every=log.log_every, eval_every=cfg.validation.every,
                    nonfinite_limit=cfg.nonfinite_limit,
                    checkpoint_format=format_of(cfg.checkpoint_format, cfg.lora.enabled))


def run_rl(cfg: RLConfig) -> Path:
    """Train; returns the final checkpoint folder. Re-running the same command resumes."""
    info = init_distributed(timeout=cfg.dist_timeout)
    check_world(cfg, info.world_size)
    check_ranks(cfg.parallel, info.world_size, cfg.rollout.batch_size, "rollout.batch_size",
                cpu_offload=cfg.cpu_offload, device=info.device.type)
    with hold_run_dir(Path(cfg.out), info):  # one run at a time in out, refused before anything loads
        step = _train(cfg, info)
    barrier()
    cleanup()
    return Path(cfg.out) / "checkpoints" / f"step-{step}"


def _train(cfg: RLConfig, info: DistInfo) -> int:
    """The run in its locked run directory: resume (the config checked against the saved one), train, save;
    returns the last step."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    harness = RunHarness(Path(cfg.out), info, schedule(cfg), row_log=True, report_to=cfg.logging.report_to,
                         config=cfg, progress=RL_PROGRESS)
    start_from, state = harness.resume_point(cfg.model)
    record_run_config(Path(cfg.out), cfg, info, RL_FREE_KEYS, resuming=state is not None)
    run = build_run(cfg, info, start_from)
    try:
        val = _load_val(cfg)
        step, position = harness.restore(state, run.opt, run.sched, run.root)
        run.engine_stale = run.engine_stale or harness.restored_weights  # the engine took the start model's
        step = harness.loop(
            step, position, lambda step, position: rl_step(run, step, position),
            desc=f"rl/{cfg.algorithm.loss}", postfix="reward/mean",
            save=lambda step, position: harness.save(step, position, run.to_save, run.processor, run.opt, run.sched,
                                                     root=run.root),
            validate=(lambda: _validate(run, val)) if val else None,
        )  # fmt: skip
    finally:
        close_run(run)
    return step


def close_run(run: RLRun) -> None:
    """Stop what the run started beside the trainer: reward workers, the judge client, the engine's worker."""
    try:
        if run.rollout.runner is not None:
            run.rollout.runner.close()
        if run.trust is not None:
            run.trust.close()
    finally:
        close_engine(run.engine)


def _load_val(cfg: RLConfig) -> list:
    if not cfg.validation.data:
        return []
    return load_samples(cfg.validation.data, registry=cfg.registry, template=cfg.template,
                        limit=cfg.validation.limit, system_prompt=cfg.system_prompt)


def val_rewards(cfg: RLConfig) -> list[RewardSpec]:
    """What validation scores with: the run's own `accuracy` check (its options, weight 1; the default check when
    the run has none), so `val_accuracy` is an accuracy whatever else the run rewards."""
    spec = next((s for s in cfg.rewards if s.name == "accuracy"), None)
    return [RewardSpec("accuracy", kwargs=dict(spec.kwargs) if spec is not None else {})]


def validation_result(run: RLRun, val: list) -> EvalResult | None:
    """Greedy evaluation of the validation samples on rank 0 (None on the others): `vlrl eval`'s own function.
    Every rank calls it: under FSDP2 they all gather the weights first."""
    with full_weights(run.root) as model:
        if not run.info.is_main:
            return None
        return evaluate_samples(model, run.processor, val, device=run.info.device,
                                max_new_tokens=run.cfg.validation.max_new_tokens, rewards=val_rewards(run.cfg))


def _validate(run: RLRun, val: list) -> dict[str, float]:
    """Greedy accuracy on the validation samples (rank 0), with eval's own generation and scoring."""
    result = validation_result(run, val)
    barrier()
    if result is None:
        return {}
    return {"val_accuracy": result.accuracy,
            **{f"val_accuracy/{k}": v["accuracy"] for k, v in result.by_task.items()}}
