"""Supervised fine-tuning: `align` (merger only) and `full` stages, assistant-only loss.

One global batch of `batch_size` samples per optimizer step, split across ranks and into micro-batches
(gradient accumulation); the loss is the sum of target-token cross-entropies divided by the global
target-token count, so every world size and micro-batch size computes the same update.
Re-running the same command resumes from the newest complete checkpoint.

The data is read whole into memory (global batch `step` = `vlrl.data.order.global_batch`), or with `stream`
shard by shard through a shuffle buffer (`vlrl.data.stream.SampleStream`: global batch `step` = the stream's
next `batch_size` samples, every rank reading the same stream; its state is saved in each checkpoint, so a resume
continues with the same batches).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlrl.config import ConfigError, check_names, check_out_path, check_ranges
from vlrl.data.loading import load_samples
from vlrl.data.order import global_batch, shard
from vlrl.data.sample import Sample
from vlrl.data.stream import SampleStream
from vlrl.data.templates import TEMPLATES
from vlrl.models.inputs import IGNORE_INDEX, Encoded, collate, encode_for_sft_cached
from vlrl.models.lora import LoRAConfig, check_lora
from vlrl.models.processor import image_token_id
from vlrl.train.checkpoint import FORMATS
from vlrl.train.dist import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vlrl.train.harness import SFT_PROGRESS, RunHarness, schedule_of
from vlrl.train.optim import make_optimizer, make_scheduler, set_trainable
from vlrl.train.parallel import (
    PARALLEL,
    autocast_here,
    call,
    clip_grads,
    full_weights,
    matched_count,
    no_sync,
    same_blocks,
    wrap,
)
from vlrl.train.policy import load_policy
from vlrl.train.precision import precision_of
from vlrl.train.rundir import RESUME_CHANGES, SFT_FREE_KEYS, hold_run_dir, record_run_config
from vlrl.train.trackers import tracker_names


@dataclass
class SFTConfig:
    model: str  # HF model folder to start from
    data: list[str]  # training datasets: registry names or data file paths
    out: str  # run directory (config.yaml, metrics.jsonl, checkpoints/); re-running resumes from it
    stage: str = "full"  # align: only the vision-language merger trains; full: every parameter
    registry: str | None = None  # registry file that dataset names resolve in (null: $VLRL_DATA_REGISTRY)
    template: str = "none"  # prompt template: none | answer | thinking | fast (a registry entry's own wins)
    system_prompt: str | None = None  # replaces (or inserts) each prompt's system turn; null: keep the data's
    skip_invalid: bool = False  # drop invalid data records (counted) instead of stopping at the first
    stream: bool = False  # read `data` shard by shard through a shuffle buffer instead of whole into memory (for
    #   data larger than memory): each global batch is the stream's next batch_size samples
    shuffle_buffer: int = 10000  # stream: samples in the shuffle buffer (more: a more uniform shuffle and more
    #   memory; 1: each shard's own row order, the shards in a seeded order)
    max_steps: int = 100  # optimizer steps to train; also the length of the LR schedule
    max_seconds: float | None = None  # stop after this many seconds of wall time (checkpointed); null: none
    batch_size: int = 32  # samples per optimizer step, over all ranks
    micro_batch_size: int = 8  # samples per forward on a rank (gradients accumulate over a rank's share)
    lr: float = 1e-3  # peak learning rate (AdamW), after warm-up; cosine decay to min_lr_ratio * lr
    weight_decay: float = 0.0  # AdamW weight decay (biases and norm weights get none)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW [beta1, beta2]; beta2 0.95
    #   forgets early gradient spikes
    warmup_steps: int = 10  # steps of linear LR warm-up to lr
    min_lr_ratio: float = 0.1  # the cosine schedule ends at min_lr_ratio * lr at max_steps
    max_grad_norm: float = 1.0  # clip the global gradient L2 norm to this before each optimizer step
    loss_agg: str = "token"  # token: every target token weighs the same; sample: every sample does
    cache_encoded: bool = False  # keep each sample's encoding (token ids, pixel values) after its first use
    freeze_vision: bool = False  # stage full: the vision tower (not its merger) stays frozen
    seed: int = 0  # seed of the data order and of torch's RNG
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters (r > 0, stage full): only they train
    parallel: str = "ddp"  # several ranks (torchrun): ddp (whole model per rank) | fsdp (FSDP2: weights, gradients
    #   and optimizer state sharded) | none (one process only); see vlrl.train.parallel
    cpu_offload: bool = False  # fsdp: keep the shards and optimizer state in host memory
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective (e.g. while rank 0
    #   validates or writes a checkpoint) before the run fails
    dtype: str = "float32"  # float32 | bfloat16 (bf16 forwards, fp32 master weights and AdamW state) |
    #   pure_bfloat16 (all bf16: half the memory, but small updates are lost; see vlrl.train.precision)
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    checkpoint_format: str = "full"  # full: rank 0 writes an HF folder (eval/serve load it) | sharded: each rank
    #   writes its own part of the weights and optimizer state (torch.distributed.checkpoint; no rank gathers the
    #   whole model; `vlrl export` makes an HF folder of it); either resumes at any world size. LoRA runs write
    #   full (their adapters are small). May change on resume (see vlrl.train.checkpoint)
    keep_checkpoints: int = 2  # newest checkpoints kept in out/checkpoints, older ones deleted (0: keep all)
    log_every: int = 10  # a metrics.jsonl line every this many steps (and at the last and validation steps)
    report_to: list[str] = field(default_factory=list)  # experiment trackers that also get the metrics and
    #   config: tensorboard | wandb | mlflow | trackio (offline, in out/; see vlrl.train.trackers); []: none
    val_data: list[str] = field(default_factory=list)  # validation splits, evaluated every `eval_every` steps
    val_limit: int = 200  # first this many records of each validation dataset
    eval_every: int = 0  # greedy validation accuracy every this many steps and at the end (0: never)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    resume_changes: str = "refuse"  # re-running into an out whose checkpoints were trained with other settings
    #   (model, data, algorithm, shapes, seed, ...; not max_steps, logging, validation): refuse | allow (resume
    #   anyway; each change is recorded in out/config.history.jsonl)
    nonfinite_limit: int = 5  # a step whose loss or gradient norm is not finite is skipped (no optimizer update,
    #   counted in metrics.jsonl as skipped_nonfinite); the run stops after this many such steps in a row (0: never)

    def __post_init__(self) -> None:
        """Refuse names and values no run can use (a ValueError naming the key), before anything loads or is
        written: `vlrl sft` then prints `error: ...` instead of a traceback after the model has loaded."""
        check_names([("stage", self.stage, STAGES), ("loss_agg", self.loss_agg, LOSS_AGGS),
                     ("template", self.template, list(TEMPLATES)), ("resume_changes", self.resume_changes, RESUME_CHANGES)])
        check_ranges([
            ("max_steps", self.max_steps, ">= 1"), ("batch_size", self.batch_size, ">= 1"),
            ("micro_batch_size", self.micro_batch_size, ">= 1"), ("lr", self.lr, "> 0"),
            ("weight_decay", self.weight_decay, ">= 0"), ("warmup_steps", self.warmup_steps, ">= 0"),
            ("min_lr_ratio", self.min_lr_ratio, "in [0, 1]"), ("max_grad_norm", self.max_grad_norm, "> 0"),
            ("save_every", self.save_every, ">= 0"), ("keep_checkpoints", self.keep_checkpoints, ">= 0"),
            ("log_every", self.log_every, ">= 0"), ("val_limit", self.val_limit, ">= 1"),
            ("eval_every", self.eval_every, ">= 0"), ("threads", self.threads, ">= 0"),
            ("shuffle_buffer", self.shuffle_buffer, ">= 1"), ("max_seconds", self.max_seconds, "> 0"),
            ("seed", self.seed, "in [0, 2**63)"), ("nonfinite_limit", self.nonfinite_limit, ">= 0"),
            ("dist_timeout", self.dist_timeout, "> 0"),
        ])  # fmt: skip
        check_adam_betas("adam_betas", self.adam_betas)
        precision_of(self.dtype)
        check_lora("lora", self.lora)
        check_parallel(self.parallel, self.cpu_offload, self.checkpoint_format)
        if self.lora.enabled and self.stage != "full":
            raise ValueError(f"lora needs stage full (stage {self.stage} trains the merger's own weights)")
        check_run(self.model, self.data, self.out)
        tracker_names(self.report_to)
        if self.stream and self.cache_encoded:
            raise ValueError("stream=true needs cache_encoded=false (a cache of every sample's encoding would hold "
                             "the whole dataset in memory)")


LOSS_AGGS = ("token", "sample")
STAGES = ("align", "full")


def check_adam_betas(key: str, betas: list[float]) -> None:
    """AdamW's [beta1, beta2], each in [0, 1) (torch raises on others, after the model has loaded)."""
    if len(betas) != 2:
        raise ValueError(f"{key} must be [beta1, beta2], got {betas}")
    check_ranges([(f"{key}[{i}]", b, "in [0, 1)") for i, b in enumerate(betas)])


def check_run(model: str, data: list[str], out: str) -> None:
    """What every training run needs: a model to start from, data, and an `out` that is (or can be) a folder."""
    if not model:
        raise ValueError("model must name a model folder")
    if not data or not all(data):
        raise ValueError(f"data must name at least one dataset, got {data}")
    check_out_path("out", out)


def _micro_loss(model: Any, batch: dict[str, torch.Tensor], agg: str, n_global: int) -> tuple[torch.Tensor, float]:
    """This micro-batch's share of the global-batch loss. `token`: sum of target-token CE / global target
    count. `sample`: sum over samples of their mean target-token CE / global sample count (each task then
    weighs by its samples, not by its answer lengths). Returns (loss to backprop, its value).
    Logits are computed only where a target follows (`logits_to_keep` as a boolean mask): the LM head over every
    prompt position would spend compute on logits that no loss reads."""
    labels = batch.pop("labels")  # [b, L]
    keep = torch.zeros_like(labels, dtype=torch.bool)  # [b, L]: position p predicts token p + 1
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(**batch, logits_to_keep=keep).logits  # [n, V]: the kept positions, row-major
    targets = labels[:, 1:][keep[:, :-1]]  # [n]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="none")  # [n]
    if agg == "token":
        loss = ce.sum() / n_global
    else:
        rows = keep.nonzero()[:, 0]  # [n]: the sample of each kept position
        per_sample = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)  # [b]
        loss = (per_sample / keep.sum(1).clamp(min=1)).sum() / n_global
    return loss, float(loss.detach())


def sft_backward(root: Any, processor: Any, samples: list, indices: list[int], loss_agg: str, micro_batch_size: int,
                 info: DistInfo, scale: float = 1.0, cache: dict[int, Encoded] | None = None,
                 sync: bool = True) -> dict[str, float]:
    """Backward of `scale` x the SFT loss of this rank's share of one global batch (`indices`), gradients
    accumulated into `.grad`, summed across ranks by the root's wrapper (`vlrl.train.parallel`; under DDP only
    when `sync`, i.e. at the last backward before the optimizer step). Returns the global loss (unscaled) and
    target tokens. Used by SFT's step and by RL's demonstration replay (`RLConfig.sft_coef`). `cache`: see
    `encode_for_sft_cached`."""
    encoded = encode_for_sft_cached(processor, samples, shard(indices, info.rank, info.world_size), cache)
    n_tokens = sum(int((e.labels != IGNORE_INDEX).sum()) for e in encoded if e.labels is not None)
    n_local = n_tokens if loss_agg == "token" else len(encoded)
    n_global = int(all_reduce_sum(torch.tensor(n_local, dtype=torch.long)).item())
    pad, img = processor.tokenizer.pad_token_id, image_token_id(processor)
    loss_sum = 0.0
    starts = list(range(0, len(encoded), micro_batch_size))
    rounds = matched_count(len(starts), root)  # every rank runs as many backwards (collectives under ddp / fsdp)
    for r in range(rounds):
        real = r < len(starts)  # else a repeat of the first micro-batch with weight 0
        k = starts[r] if real else 0
        batch = collate(encoded[k : k + micro_batch_size], pad, img, padding_side="right")
        batch = {n: t.to(info.device) for n, t in batch.items()}
        same_blocks(root, "pixel_values" in batch)
        with no_sync(root, sync and r == rounds - 1):
            loss, value = call(root, _micro_loss, batch, loss_agg, max(1, n_global))
            (loss * (scale if real else 0.0)).backward()  # x 1.0 is exact: SFT's own update is unchanged
        loss_sum += value if real else 0.0
    total = all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64)).item()
    n_tok_global = all_reduce_sum(torch.tensor(n_tokens, dtype=torch.long)).item()
    return {"loss": total, "target_tokens": float(n_tok_global)}


def check_parallel(mode: str, cpu_offload: bool, checkpoint_format: str) -> None:
    """`parallel`, what goes with it and how checkpoints are written, refused with the key's name before anything
    loads."""
    check_names([("parallel", mode, PARALLEL), ("checkpoint_format", checkpoint_format, FORMATS)])
    if cpu_offload and mode != "fsdp":
        raise ValueError(f"cpu_offload needs parallel fsdp (got {mode})")


def check_ranks(mode: str, world_size: int, batch_size: int, key: str = "batch_size", cpu_offload: bool = False,
                device: str = "cpu") -> None:
    """What only the launch can tell: several ranks need ddp or fsdp, at least one item per rank, and offloading
    needs an accelerator to offload from."""
    if cpu_offload and device == "cpu":
        raise ConfigError("cpu_offload moves FSDP2's shards from the GPU to host memory; this run is on the CPU, "
                          "where they are already: drop cpu_offload")
    if world_size > 1 and mode == "none":
        raise ConfigError(f"parallel none runs one process, but {world_size} were started; use parallel ddp or fsdp")
    if batch_size < world_size:
        raise ConfigError(f"{key} {batch_size} leaves ranks without items at {world_size} ranks; use at least "
                          f"{world_size}")


def run_sft(cfg: SFTConfig) -> Path:
    """Train; returns the final checkpoint folder. Re-running the same command resumes."""
    if cfg.loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg {cfg.loss_agg!r}; valid: {', '.join(LOSS_AGGS)}")
    if cfg.stream and (cfg.cache_encoded or cfg.shuffle_buffer < 1):
        raise ValueError("stream=true needs shuffle_buffer >= 1 and cache_encoded=false (a cache of every "
                         "sample's encoding would hold the whole dataset in memory)")
    info = init_distributed(timeout=cfg.dist_timeout)
    check_ranks(cfg.parallel, info.world_size, cfg.batch_size, cpu_offload=cfg.cpu_offload, device=info.device.type)
    with hold_run_dir(Path(cfg.out), info):  # one run at a time in out, refused before anything loads
        step = _train(cfg, info)
    barrier()
    cleanup()
    return Path(cfg.out) / "checkpoints" / f"step-{step}"


def _train(cfg: SFTConfig, info: DistInfo) -> int:
    """The run in its locked run directory: resume (the config checked against the saved one), train, save;
    returns the last step."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    harness = RunHarness(Path(cfg.out), info, schedule_of(cfg), report_to=cfg.report_to, config=cfg,
                         progress=SFT_PROGRESS)
    start_from, state = harness.resume_point(cfg.model)
    record_run_config(Path(cfg.out), cfg, info, SFT_FREE_KEYS, resuming=state is not None)
    torch.manual_seed(cfg.seed)
    precision = precision_of(cfg.dtype)
    policy = load_policy(cfg.model, start_from, state is not None, precision.param_dtype, cfg.lora)
    model, processor = policy.model, policy.processor
    model.to(info.device)
    model.train()
    if not cfg.lora.enabled:
        set_trainable(model, cfg.stage, freeze_vision=cfg.freeze_vision)
    root = wrap(model, cfg.parallel, info, precision, cpu_offload=cfg.cpu_offload)
    params = [p for p in root.parameters() if p.requires_grad]  # (sharded under fsdp)
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay, betas=(cfg.adam_betas[0], cfg.adam_betas[1]))
    sched = make_scheduler(opt, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    stream = open_stream(cfg, state) if cfg.stream else None
    samples = [] if stream is not None else load_samples(cfg.data, registry=cfg.registry, template=cfg.template,
                                                         skip_invalid=cfg.skip_invalid, system_prompt=cfg.system_prompt)
    val = _load_val(cfg)
    cache: dict[int, Encoded] | None = {} if cfg.cache_encoded else None
    step, position = harness.restore(state, opt, sched, root)

    def step_fn(step: int, position: int) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        ts = time.perf_counter()
        batch, indices = next_batch(step, cfg, samples, stream)
        with autocast_here(root, precision, info.device):
            stats = sft_backward(root, processor, batch, indices, cfg.loss_agg, cfg.micro_batch_size, info,
                                 cache=cache)
        grad_norm = clip_grads(params, cfg.max_grad_norm)
        finite = math.isfinite(grad_norm) and math.isfinite(stats["loss"])  # global values: every rank agrees
        if finite:  # else skipped: the weights and AdamW's moments stay as they are (see NonFiniteCount)
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record = {**stats, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "step_s": time.perf_counter() - ts,
                  "skipped_nonfinite": int(not finite)}  # fmt: skip
        return record, [], position + cfg.batch_size

    step = harness.loop(
        step, position, step_fn, desc=f"sft/{cfg.stage}", postfix="loss",
        save=lambda step, position: harness.save(step, position, policy.to_save, processor, opt, sched, root=root,
                                                 extra=None if stream is None else {"stream": stream.state_dict()}),
        validate=(lambda: _validate(root, processor, val, info)) if val else None,
    )  # fmt: skip
    return step


def open_stream(cfg: SFTConfig, state: dict[str, Any] | None) -> SampleStream:
    """The run's data stream, at the checkpoint's position when resuming (`state`: its trainer state)."""
    saved = None if state is None else state.get("stream")
    if state is not None and saved is None and state["position"] > 0:
        raise ValueError(f"the checkpoint in {cfg.out} was written with stream=false: its data position is not a "
                         "stream's; resume with stream=false or train into another out directory")
    return SampleStream(cfg.data, registry=cfg.registry, seed=cfg.seed, buffer_size=cfg.shuffle_buffer,
                        template=cfg.template, system_prompt=cfg.system_prompt, skip_invalid=cfg.skip_invalid,
                        state=saved)


def next_batch(step: int, cfg: SFTConfig, samples: list[Sample], stream: SampleStream | None
               ) -> tuple[list[Sample], list[int]]:
    """Global batch `step` as (samples, the batch's indices into them); every rank gets the same and trains its
    `shard` of the indices. In memory: `global_batch` of the whole list. Streamed: the stream's next `batch_size`
    samples (called once per step, in step order: the stream is where the previous batch left it)."""
    if stream is None:
        return samples, global_batch(step, cfg.batch_size, len(samples), cfg.seed)
    batch = stream.take(cfg.batch_size)
    if len(batch) < cfg.batch_size:  # the stream is endless: only data without a valid sample ends it
        raise ValueError(f"no samples in {', '.join(cfg.data)}")
    return batch, list(range(len(batch)))


def _load_val(cfg: SFTConfig) -> list:
    if not cfg.val_data:
        return []
    return load_samples(cfg.val_data, registry=cfg.registry, template=cfg.template, limit=cfg.val_limit,
                        system_prompt=cfg.system_prompt)


def _validate(root: Any, processor: Any, val: list, info: DistInfo) -> dict[str, float]:
    from vlrl.eval.evaluate import evaluate_samples

    with full_weights(root) as model:  # every rank takes part in gathering the weights; rank 0 evaluates
        model.eval()
        result = evaluate_samples(model, processor, val, device=info.device) if info.is_main else None
        model.train()
        barrier()
    if result is None:
        return {}
    return {"val_accuracy": result.accuracy, **{f"val_accuracy/{k}": v["accuracy"] for k, v in result.by_task.items()}}
