"""`RLConfig`: the configuration of `vlrl rl`, grouped in sections that follow an RL step.

    model, data, out, rewards, ...   what to train on what, and the run's compute settings (top level)
    rollout:     sampling the step's B x G completions and scoring them
    algorithm:   advantage estimator, policy loss, clipping, KL, epochs and minibatches over the rollouts
    optim:       AdamW, its schedule, gradient clipping, frozen parts
    replay:      demonstrations replayed with the RL loss (PPO-ptx)
    trust:       Trust-GRPO's judge process rewards (`vlrl.train.trust.TrustConfig`)
    logging:     metrics, samples and checkpoints
    validation:  greedy accuracy on held-out data during the run

In YAML each section is a mapping (`rollout: {group_size: 8}`); on the command line a dotted key
(`rollout.group_size=8`). A section given in part keeps its other keys' defaults.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from vlrl.algos import ADVANTAGES, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES
from vlrl.config import ConfigError, check_names, check_ranges
from vlrl.data.templates import TEMPLATES
from vlrl.eval.evaluate import check_vllm
from vlrl.models.lora import LoRAConfig, check_lora
from vlrl.rewards.registry import RewardSpec, check_reward_keys
from vlrl.rollout.base import ENGINES
from vlrl.rollout.types import SamplingParams
from vlrl.rollout.vllm_engine import VLLMConfig
from vlrl.train.precision import precision_of
from vlrl.train.rundir import RESUME_CHANGES
from vlrl.train.sft import LOSS_AGGS, check_adam_betas, check_parallel, check_run
from vlrl.train.trackers import tracker_names
from vlrl.train.trust import TrustConfig


@dataclass
class RolloutConfig:
    engine: str = "hf"  # rollout engine: hf (in-process generate) | vllm (a vLLM worker process, rollout.vllm)
    batch_size: int = 8  # B: prompts per step, global
    group_size: int = 8  # G: completions per prompt
    max_new_tokens: int = 32  # completion length limit in tokens (longer ones are truncated)
    temperature: float = 1.0  # sampling temperature (> 0); the training log-probs use the same
    top_p: float = 1.0  # nucleus sampling: smallest token set with this probability mass (1.0: off)
    top_k: int = 0  # sample among the k most likely tokens (0: off)
    max_prompts_per_call: int = 0  # prompts per generate call on a rank (0: all)
    decode_threads: int = 1  # hf engine on CPU: decode shards in Python threads (>1 helps on a busy machine)
    reward_workers: int = 0  # reward worker processes (0: in-process, no time limit)
    reward_timeout: float = 10.0  # reward_workers > 0: seconds a reward call may take; a call past it is killed
    #   and its completions get None (unscored by that reward)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    dynamic_max_tries: int = 4  # draws per step at most (the first included)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # engine vllm: its worker (colocated, or a server's url)


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # advantage estimator, a vlrl.algos.ADVANTAGES name (e.g. grpo, dr_grpo, rloo)
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)  # the estimator's keyword arguments
    #   (e.g. {scale: batch} for grpo)
    loss: str = "ppo_clip"  # policy loss, a vlrl.algos.POLICY_LOSSES name (e.g. ppo_clip, gspo)
    eps_low: float | None = None  # lower clip: ratio >= 1 - eps_low; null: the loss's own default
    eps_high: float | None = None  # upper clip: ratio <= 1 + eps_high; null: the loss's own default
    dual_clip: float | None = None  # ppo_clip only: dual-clip bound c > 1 for negative advantages; null: off
    agg_mode: str = "seq-mean-token-mean"  # loss reduction over tokens and rows, a vlrl.algos.AGG_MODES name
    beta: float = 0.0  # KL coefficient; 0 = no reference model
    kl_estimator: str | None = None  # k1 | k2 | k3; null: k3 in the loss, k1 in the reward
    kl_in_reward: bool = False  # subtract beta * KL from the rewards instead of adding it to the loss
    kl_clamp: float | None = None  # clamp per-token KL estimates to [-kl_clamp, kl_clamp]; null: no clamp
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no loss
    ppo_epochs: int = 1  # passes over each step's rollouts (GRPO's μ)
    num_minibatches: int = 1  # optimizer steps per epoch


@dataclass
class OptimConfig:
    lr: float = 1e-6  # peak learning rate (AdamW), after warm-up; cosine decay to min_lr_ratio * lr
    weight_decay: float = 0.0  # AdamW weight decay (biases and norm weights get none)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    warmup_steps: int = 0  # steps of linear LR warm-up to lr
    min_lr_ratio: float = 0.0  # the cosine schedule ends at min_lr_ratio * lr at max_steps
    max_grad_norm: float = 1.0  # clip the global gradient L2 norm to this before each optimizer step
    freeze_vision: bool = False  # the vision tower (not its merger) stays frozen
    freeze_merger: bool = False  # the vision-language merger stays frozen


@dataclass
class ReplayConfig:
    """Demonstration replay (InstructGPT's PPO-ptx, Ouyang et al. 2022): each step also backpropagates
    coef x the SFT loss of batch_size samples of data, so RL does not erase what SFT taught on prompts it
    does not sample."""

    data: list[str] = field(default_factory=list)  # demonstration datasets: registry names or paths
    coef: float = 0.0  # weight of the replayed SFT loss in each step's gradient (0: off)
    batch_size: int = 16  # demonstrations per step, over all ranks
    loss_agg: str = "sample"  # token | sample: the replayed loss's reduction, as SFT's loss_agg


@dataclass
class LoggingConfig:
    log_every: int = 1  # a metrics.jsonl line every this many steps (and at the last and validation steps)
    log_samples: int = 8  # completions written to samples.jsonl per logged step
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in out/checkpoints, older ones deleted (0: keep all)
    report_to: list[str] = field(default_factory=list)  # experiment trackers that also get the metrics, config
    #   and samples: tensorboard | wandb | mlflow | trackio (offline, in out/; see vlrl.train.trackers); []: none


@dataclass
class ValidationConfig:
    data: list[str] = field(default_factory=list)  # validation splits, evaluated every `every` steps
    limit: int = 200  # first this many records of each validation dataset
    every: int = 0  # greedy validation accuracy every this many steps and at the end (0: never)
    max_new_tokens: int = 32  # answer length limit of the validation generations, in tokens


@dataclass
class RLConfig:
    model: str  # HF model folder to start from (usually an SFT checkpoint)
    data: list[str]  # training datasets: registry names or data file paths
    out: str  # run directory (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/); re-running resumes
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy")])  # the rewards
    #   summed with weights, each {name, weight, kwargs, label} (label: tells two specs of one reward apart)
    ref_model: str | None = None  # frozen KL reference (default: `model`); loaded only when algorithm.beta > 0
    registry: str | None = None  # registry file that dataset names resolve in (null: $VLRL_DATA_REGISTRY)
    template: str = "none"  # prompt template: none | answer | thinking | fast (a registry entry's own wins)
    system_prompt: str | None = None  # replaces (or inserts) each prompt's system turn; null: keep the data's
    skip_invalid: bool = False  # drop invalid data records (counted) instead of stopping at the first
    min_pixels: int | None = None  # images smaller than this many pixels are upscaled; null: processor's own
    max_pixels: int | None = None  # images larger than this many pixels are downscaled; null: processor's own
    max_steps: int = 100  # RL steps to train; also the length of the LR schedule
    max_seconds: float | None = None  # stop after this many seconds of wall time (checkpointed); null: none
    seed: int = 0  # seed of the prompt order, the rollouts' sampling and torch's RNG
    # how the training forwards compute
    dtype: str = "float32"  # float32 | bfloat16 (bf16 forwards, fp32 master weights and AdamW state; the reference
    #   in bf16) | pure_bfloat16 (all bf16: half the memory, but small updates are lost; see vlrl.train.precision)
    micro_batch_size: int = 8  # rows (completions) per forward on a rank
    logprob_chunk_tokens: int = 2048  # completion tokens whose logits exist at once in the training forwards (the
    #   LM head runs in chunks, recomputed in the backward: memory, not results; see vlrl.train.logprobs)
    share_vision: bool = True  # encode each prompt's images once for its G rows in training forwards
    shared_prefix: bool = True  # run each prompt once per group in training / reference forwards, its KV cache
    #   expanded to the group's rows (same log-probs and gradients; off: [prompt | completion] per row)
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, slower)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    resume_changes: str = "refuse"  # re-running into an out whose checkpoints were trained with other settings
    #   (model, data, algorithm, shapes, seed, ...; not max_steps, logging, validation): refuse | allow (resume
    #   anyway; each change is recorded in out/config.history.jsonl)
    nonfinite_limit: int = 5  # a step whose loss or gradient norm is not finite is skipped (no optimizer update,
    #   counted in metrics.jsonl as skipped_nonfinite); the run stops after this many such steps in a row (0: never)
    # the sections
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # sampling and scoring the completions
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # advantage, loss, KL
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its schedule
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # SFT demonstrations replayed (PPO-ptx)
    trust: TrustConfig = field(default_factory=TrustConfig)  # Trust-GRPO (SophiaVL-R1): judge process rewards
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics, samples, checkpoints
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out accuracy during the run
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters (r > 0): only they train
    parallel: str = "ddp"  # several ranks (torchrun): ddp (whole model per rank) | fsdp (FSDP2: weights, gradients
    #   and optimizer state sharded; the reference too) | none (one process only); see vlrl.train.parallel
    cpu_offload: bool = False  # fsdp: keep the shards and optimizer state in host memory
    checkpoint_format: str = "full"  # full: rank 0 writes an HF folder (eval/serve load it) | sharded: each rank
    #   writes its own part of the weights and optimizer state (torch.distributed.checkpoint; no rank gathers the
    #   whole model; `vlrl export` makes an HF folder of it); either resumes at any world size. LoRA runs write
    #   full (their adapters are small). May change on resume (see vlrl.train.checkpoint)
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective (e.g. while rank 0
    #   validates or writes a checkpoint) before the run fails

    def __post_init__(self) -> None:
        """Every name and value checked when the config is made (`check_config`), so that `vlrl rl` refuses a bad
        one with `error: ...` before it writes or loads anything."""
        check_config(self)

    @property
    def sampling(self) -> SamplingParams:
        r = self.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, n=r.group_size)

    @property
    def needs_old_logp(self) -> bool:
        """Old log-probs need their own pass unless one epoch over one minibatch (then = detached current)."""
        a = self.algorithm
        return a.ppo_epochs > 1 or a.num_minibatches > 1 or (a.kl_in_reward and a.beta > 0)


def check_config(cfg: RLConfig) -> dict[str, Any]:
    """Fail early on names and values; return the policy loss's keyword arguments."""
    a, r = cfg.algorithm, cfg.rollout
    _check_advantage(a.advantage, a.advantage_kwargs)
    AGG_MODES.get(a.agg_mode)
    fn = POLICY_LOSSES.get(a.loss)
    if a.kl_estimator is not None:
        KL_ESTIMATORS.get(a.kl_estimator)
    precision_of(cfg.dtype)
    check_names([("rollout.engine", r.engine, list(ENGINES)), ("template", cfg.template, list(TEMPLATES)),
                 ("resume_changes", cfg.resume_changes, RESUME_CHANGES)])
    positive = [("rollout", r, ("batch_size", "group_size", "max_new_tokens", "dynamic_max_tries", "decode_threads")),
                ("algorithm", a, ("ppo_epochs", "num_minibatches")), ("", cfg, ("micro_batch_size", "logprob_chunk_tokens"))]
    for section, obj, names in positive:
        for name in names:
            if getattr(obj, name) < 1:
                key = f"{section}.{name}" if section else name
                raise ValueError(f"{key} must be >= 1, got {getattr(obj, name)}")
    check_ranges(_ranges(cfg))
    check_lora("lora", cfg.lora)
    check_parallel(cfg.parallel, cfg.cpu_offload, cfg.checkpoint_format)
    if cfg.parallel == "fsdp" and r.engine == "vllm":
        raise ValueError("parallel fsdp with rollout.engine vllm is not supported yet (the weight push reads whole "
                         "tensors); use parallel ddp, or rollout.engine hf")
    if cfg.lora.enabled and r.engine == "vllm":
        raise ValueError("lora with rollout.engine vllm is not supported yet (the worker loads whole checkpoint "
                         "weights, not adapters); use rollout.engine hf")
    check_vllm("rollout.vllm", r.engine, r.vllm)  # after: the combinations above are refused whatever the worker
    check_adam_betas("optim.adam_betas", cfg.optim.adam_betas)
    check_run(cfg.model, cfg.data, cfg.out)
    tracker_names(cfg.logging.report_to)
    if not cfg.rewards:
        raise ValueError("rewards: name at least one reward")
    check_reward_keys(cfg.rewards)
    p = cfg.replay
    if p.coef < 0:
        raise ValueError(f"replay.coef must be >= 0, got {p.coef}")
    if p.coef > 0 and not p.data:
        raise ValueError("replay.coef > 0 needs replay.data (the demonstrations to replay)")
    if p.loss_agg not in LOSS_AGGS:
        raise ValueError(f"replay.loss_agg {p.loss_agg!r}; valid: {', '.join(LOSS_AGGS)}")
    if r.reward_timeout <= 0:
        raise ValueError(f"rollout.reward_timeout must be > 0, got {r.reward_timeout}")
    if r.temperature <= 0:
        raise ValueError("rollout.temperature must be > 0 for RL sampling")
    keys = [spec.key for spec in cfg.rewards]
    if cfg.trust.enabled and cfg.trust.outcome_reward not in keys:
        raise ValueError(f"trust.outcome_reward {cfg.trust.outcome_reward!r} is not one of the rewards: "
                         f"{', '.join(keys)}")
    kwargs = {k: v for k, v in (("eps_low", a.eps_low), ("eps_high", a.eps_high), ("dual_clip", a.dual_clip))
              if v is not None}
    accepted = set(inspect.signature(fn).parameters)
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ValueError(f"algorithm.loss {a.loss!r} takes no {', '.join(bad)}")
    return kwargs


def check_world(cfg: RLConfig, world_size: int) -> None:
    """What only the launch can tell (`run_rl` calls it before anything loads): a vLLM server is refused under
    several ranks, since each rank's engine would push its own weights to the one worker (a colocated worker per
    rank, `rollout.vllm.url` empty, is fine)."""
    url = cfg.rollout.vllm.url
    if cfg.rollout.engine == "vllm" and url and world_size > 1:
        raise ConfigError(f"rollout.vllm.url {url!r} with {world_size} ranks: every rank would push its weights "
                          "to that one vLLM worker; run one process, or leave rollout.vllm.url empty for a colocated "
                          "worker per rank")


def _check_advantage(name: str, kwargs: dict[str, Any]) -> None:
    """The estimator `name` exists and takes `kwargs`: it runs once on a tiny reward tensor, so an unknown
    argument or a bad value (`scale: sideways`) stops the run now rather than at its first step, after the model
    has loaded. The estimators are pure tensor functions (`vlrl.algos`): nothing else runs."""
    estimator = ADVANTAGES.get(name)
    try:
        estimator(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"algorithm.advantage_kwargs {kwargs!r} for {name}: {err}") from None


def _ranges(cfg: RLConfig) -> list[tuple[str, Any, str]]:
    """(key, value, range) of the numeric keys of every section that `check_config` checks with `check_ranges`
    (those it checks itself, >= 1 counts and the sampling temperature, are not repeated)."""
    r, a, o, g, v = cfg.rollout, cfg.algorithm, cfg.optim, cfg.logging, cfg.validation
    return [
        ("max_steps", cfg.max_steps, ">= 1"), ("max_seconds", cfg.max_seconds, "> 0"),
        ("seed", cfg.seed, "in [0, 2**63)"), ("threads", cfg.threads, ">= 0"),
        ("nonfinite_limit", cfg.nonfinite_limit, ">= 0"), ("dist_timeout", cfg.dist_timeout, "> 0"),
        ("min_pixels", cfg.min_pixels, ">= 1"), ("max_pixels", cfg.max_pixels, ">= 1"),
        ("rollout.top_p", r.top_p, "in (0, 1]"), ("rollout.top_k", r.top_k, ">= 0"),
        ("rollout.max_prompts_per_call", r.max_prompts_per_call, ">= 0"),
        ("rollout.reward_workers", r.reward_workers, ">= 0"),
        ("algorithm.eps_low", a.eps_low, "in [0, 1)"), ("algorithm.eps_high", a.eps_high, ">= 0"),
        ("algorithm.dual_clip", a.dual_clip, "> 1"), ("algorithm.beta", a.beta, ">= 0"),
        ("algorithm.kl_clamp", a.kl_clamp, "> 0"),
        ("optim.lr", o.lr, "> 0"), ("optim.weight_decay", o.weight_decay, ">= 0"),
        ("optim.warmup_steps", o.warmup_steps, ">= 0"), ("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]"),
        ("optim.max_grad_norm", o.max_grad_norm, "> 0"), ("replay.batch_size", cfg.replay.batch_size, ">= 1"),
        ("logging.log_every", g.log_every, ">= 0"), ("logging.log_samples", g.log_samples, ">= 0"),
        ("logging.save_every", g.save_every, ">= 0"), ("logging.keep_checkpoints", g.keep_checkpoints, ">= 0"),
        ("validation.limit", v.limit, ">= 1"), ("validation.every", v.every, ">= 0"),
        ("validation.max_new_tokens", v.max_new_tokens, ">= 1"),
    ]  # fmt: skip
