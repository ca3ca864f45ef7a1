"""`vlrl curate`: rollout-based difficulty filtering (LLaVA-OneVision-1.5-RL, Innovator-VL).

For every item: N completions sampled with the rollout engine, scored with the run's rewards (default
`accuracy`), and (pass1="greedy") one greedy completion; then the statistics of `vlrl.eval.passk` and the
band filter of `vlrl.curate.filter`. Outputs in `out`:

    samples.jsonl   per item: id, seed, every sample (text, reward, each reward's value, length, truncated),
                    the greedy completion, its statistics. The statistics are recomputed from this file.
    stats.jsonl     per item: mean, min, max, pass_rate, pass_at_1, pass_at_n, gap, kept
    kept.jsonl      the kept records in the input's schema, statistics under `curate` (kept.parquet with parquet)
    report.json     complete (true), totals, kept fraction, pass-rate histogram, per task, times (also printed)
    metrics.jsonl   one line per batch (rank 0's): step (batches over the life of the run directory),
                    items_done / items_total, mean_reward and mean_pass_rate over the items done so far (the
                    report's figures once all are done), time/generate and time/score (s, that batch),
                    elapsed_s (s since this invocation's sampling began)
    config.yaml     the resolved config

The loop is the run harness of SFT and RL (`vlrl.train.harness`): one step is one batch of items, and the
step's checkpoint is the batch's lines appended to this rank's part file (`vlrl.curate.store`), durable before
the step counts. Resume: re-running the same command skips the ids already there and numbers its metrics
lines on from the last one. Changing a sampling setting (model, n, seed, rewards, template, ...) on a run
directory that holds samples is an error; the band, threshold and ranking may change freely.

Time budget (`max_seconds`): the run stops after the batch that crosses it (each invocation runs at least one
batch, and each has the whole budget). Rank 0 then merges what every rank finished into samples.jsonl and
writes report.json with `complete: false`, items_done and items_total, and no stats or kept files (a kept set
needs every item); re-running the same command continues, and the run that samples the last item filters.

Distribution (`torchrun`): the remaining items are split across ranks (rank r takes every world-th one), each
rank writes its own part file and keeps its own time budget, rank 0 merges. metrics.jsonl is rank 0's: its
items_total is the items finished before this invocation plus rank 0's share of the rest. Each item's seed is `mix_seed(seed, hash(id))`, so its
completions do not depend on the rank, the world size or the order of the data (the engine's draw is
batch-invariant up to floating-point differences in the logits between batch shapes).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrl.config import check_names, check_out_path, check_ranges, to_dict
from vlrl.curate.filter import PASS1_MODES, ItemStats, item_stats, parse_band
from vlrl.curate.report import FilterSpec, finish, finish_partial, stats_of
from vlrl.curate.store import ResultLog, last_logged_step, merge_parts, part_path, read_results
from vlrl.data.errors import DataError
from vlrl.data.loading import templated
from vlrl.data.registry import load_dataset
from vlrl.data.sample import Sample
from vlrl.data.templates import TEMPLATES
from vlrl.eval.evaluate import check_vllm, close_engine
from vlrl.rewards.registry import RewardSpec, specs_or_names
from vlrl.rollout.base import ENGINES, RolloutEngine, make_engine
from vlrl.rollout.sampler import mix_seed
from vlrl.rollout.types import Group, SamplingParams
from vlrl.rollout.vllm_engine import VLLMConfig
from vlrl.train.dist import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from vlrl.train.harness import RunHarness, Schedule
from vlrl.train.rl_rollout import score_groups
from vlrl.train.rundir import Change, check_config_changes, hold_run_dir, write_config
from vlrl.train.trackers import check_trackers, tracker_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# settings that change what is sampled or how it is scored: fixed for the life of a run directory
SAMPLING_KEYS = ("model", "n", "seed", "max_new_tokens", "temperature", "top_p", "top_k", "rewards", "template",
                 "system_prompt", "pass1", "min_pixels", "max_pixels", "dtype", "rollout_engine")
# of the vLLM worker's settings (free otherwise: where it runs, its resources and timeouts), those that change what
# it samples: the precision of its logits, and a length limit that can end completions early
VLLM_SAMPLING_KEYS = ("vllm.dtype", "vllm.max_model_len")


@dataclass
class CurateConfig:
    model: str  # HF model folder (usually the SFT checkpoint RL will start from)
    data: list[str]  # datasets to curate: registry names or data file paths
    out: str  # output directory (samples, stats, kept records, report); re-running resumes
    n: int = 8  # completions sampled per item
    band: list[float] | str = field(default_factory=lambda: [0.0, 1.0])  # keep items with LOW <
    #   mean reward < HIGH and min < max; written [LOW, HIGH] or "LOW,HIGH" (`--band 0,0.6`)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy")])  # as in the RL config
    reward: list[str] = field(default_factory=list)  # shorthand: reward names, weight 1 (replaces `rewards`)
    threshold: float = 0.5  # a completion passes when its (weighted) reward >= threshold
    pass1: str = "greedy"  # pass@1 from a greedy completion ("greedy") or from the first sample ("first")
    rank_by_gap: bool = False  # order the kept items by pass@N - pass@1, largest first
    max_keep: int | None = None  # keep at most this many (after ranking)
    parquet: bool = False  # also write kept.parquet
    registry: str | None = None  # registry file that dataset names resolve in (null: $VLRL_DATA_REGISTRY)
    template: str = "none"  # prompt template, as in RL and eval (`vlrl.data.templates`)
    system_prompt: str | None = None  # replaces (or inserts) each prompt's system turn; null: keep the data's
    skip_invalid: bool = False  # drop invalid data records (counted) instead of stopping at the first
    limit: int | None = None  # first `limit` items of each dataset; null: all
    min_pixels: int | None = None  # images smaller than this many pixels are upscaled; null: processor's own
    max_pixels: int | None = None  # images larger than this many pixels are downscaled; null: processor's own
    dtype: str = "float32"  # model weights: float32 | bfloat16 | float16
    rollout_engine: str = "hf"  # hf (in-process generate) | vllm
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # rollout_engine vllm: its worker (colocated, or a url)
    max_new_tokens: int = 32  # completion length limit in tokens (longer ones are truncated)
    temperature: float = 1.0  # sampling temperature of the n completions (> 0)
    top_p: float = 1.0  # nucleus sampling: smallest token set with this probability mass (1.0: off)
    top_k: int = 0  # sample among the k most likely tokens (0: off)
    batch_size: int = 8  # items per engine call on a rank (a batch is also the unit of resume and of metrics)
    max_seconds: float | None = None  # stop after the batch that crosses this many seconds of sampling in this
    #   invocation (at least one batch runs); re-running the same command continues; null: no limit
    seed: int = 0  # each item's sampling seed is mix_seed(seed, hash of its id)
    report_to: list[str] = field(default_factory=list)  # experiment trackers that also get the metrics and
    #   config: tensorboard | wandb | mlflow | trackio (offline, in out/; see vlrl.train.trackers); []: none
    threads: int = 0  # torch intra-op threads (0: leave torch's default)

    def __post_init__(self) -> None:
        self.rewards, self.reward = specs_or_names(self.rewards, self.reward), []
        self.band = list(parse_band(self.band))  # validated, and one spelling in config.yaml
        for name in ("n", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pass1 not in PASS1_MODES:
            raise ValueError(f"pass1 must be one of {', '.join(PASS1_MODES)}, got {self.pass1!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling (pass1=greedy adds the greedy completion)")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 (null: no limit), got {self.max_seconds}")
        if self.max_keep is not None and self.max_keep < 0:
            raise ValueError(f"max_keep must be >= 0, got {self.max_keep}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        check_names([("rollout_engine", self.rollout_engine, list(ENGINES)),
                     ("template", self.template, list(TEMPLATES))])
        check_ranges([("top_p", self.top_p, "in (0, 1]"), ("top_k", self.top_k, ">= 0"), ("limit", self.limit, ">= 1"),
                      ("min_pixels", self.min_pixels, ">= 1"), ("max_pixels", self.max_pixels, ">= 1"),
                      ("seed", self.seed, "in [0, 2**63)"), ("threads", self.threads, ">= 0")])
        check_vllm("vllm", self.rollout_engine, self.vllm)
        if not self.model or not self.data or not all(self.data):
            raise ValueError("model and data must be given (data: at least one dataset)")
        check_out_path("out", self.out)
        tracker_names(self.report_to)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, n=self.n)

    @property
    def filter_spec(self) -> FilterSpec:
        return FilterSpec(self.threshold, self.pass1, parse_band(self.band), self.rank_by_gap,
                          self.max_keep, self.parquet)


@dataclass(frozen=True)
class Item:
    """One item to curate: the sample as read (written back if kept) and its templated prompt (sampled)."""

    original: Sample
    prompt: Sample

    @property
    def id(self) -> str:
        return self.original.id


def load_items(cfg: CurateConfig) -> list[Item]:
    """Every dataset of `cfg.data`, each sample with the prompt template RL and eval would give it."""
    items: list[Item] = []
    where: dict[str, str] = {}
    for spec in cfg.data:
        ds = load_dataset(spec, registry=cfg.registry, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
        if ds.n_skipped:
            print(f"{spec}: skipped {ds.n_skipped} invalid record(s)")
        for s in ds.samples:
            if s.id in where:
                raise DataError(spec, None, "id", f"duplicate id {s.id!r} (also in {where[s.id]}); ids must be "
                                "unique across the datasets of one curation run")
            where[s.id] = spec
            items.append(Item(s, templated(s, ds.template or cfg.template, cfg.system_prompt)))
    if not items:
        raise DataError(", ".join(cfg.data), None, None, "no samples to curate")
    return items


def item_seed(run_seed: int, item_id: str) -> int:
    """The item's sampling seed: from the run seed and a stable hash of its id (not Python's salted hash)."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()
    return mix_seed(run_seed, int.from_bytes(digest[:8], "little"))


def check_resumable(cfg: CurateConfig, out: Path, has_results: bool) -> list[Change]:
    """Refuse to add samples drawn with other settings to a run directory that already holds samples (the check
    SFT and RL resume with, `vlrl.train.rundir`); returns every change from the saved config, for its history."""
    changes, _ = check_config_changes(
        out, cfg, lambda key: key.split(".")[0] not in SAMPLING_KEYS and key not in VLLM_SAMPLING_KEYS,
        enforce=has_results, allow=False,
        what=f"{out} holds samples drawn with other settings",
        hint="use another out directory, or the same settings to resume / re-filter")  # fmt: skip
    return changes


def _reward_value(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _completion_rows(group: Group, scores: torch.Tensor, per: dict[str, list[float | None]], start: int
                     ) -> list[dict[str, Any]]:
    return [{"text": c.text, "reward": _reward_value(float(scores[start + j])),
             "rewards": {k: v[start + j] for k, v in per.items()}, "length": c.length, "truncated": c.truncated}
            for j, c in enumerate(group.completions)]


@dataclass
class Progress:
    """What each metrics.jsonl line reports: items finished (before this invocation, and since by this rank) of
    `total`, and the running means over them that report.json gives at the end (mean_reward over the items with
    a scored completion, mean_pass_rate over all)."""

    total: int
    done: int = 0
    reward_sum: float = 0.0
    n_scored: int = 0
    pass_sum: float = 0.0

    def add(self, stats: ItemStats) -> None:
        self.done += 1
        self.pass_sum += stats.pass_rate
        if stats.mean is not None:
            self.reward_sum += stats.mean
            self.n_scored += 1

    def record(self) -> dict[str, Any]:
        # nan (logged as null) before any item is scored: the progress bar formats the value as a float
        return {"items_done": self.done, "items_total": self.total,
                "mean_reward": self.reward_sum / self.n_scored if self.n_scored else math.nan,
                "mean_pass_rate": self.pass_sum / self.done if self.done else math.nan}


def sample_batch(engine: RolloutEngine, chunk: Sequence[Item], cfg: CurateConfig
                 ) -> tuple[list[dict[str, Any]], list[ItemStats], dict[str, float]]:
    """Sample and score one batch of items: their samples.jsonl lines, their statistics, and the seconds spent
    generating (sampled and greedy) and scoring (`time/generate`, `time/score`)."""
    greedy_sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, n=1)
    prompts = [it.prompt for it in chunk]
    seeds = [item_seed(cfg.seed, it.id) for it in chunk]
    t = time.perf_counter()
    groups = engine.generate(prompts, cfg.n, cfg.sampling, seeds=seeds)
    t_gen, t = time.perf_counter() - t, time.perf_counter()
    scores, per = score_groups(groups, cfg.rewards)  # [len(chunk) * n]
    t_score = time.perf_counter() - t
    greedy: list[dict[str, Any] | None] = [None] * len(chunk)
    if cfg.pass1 == "greedy":
        t = time.perf_counter()
        g_groups = engine.generate(prompts, 1, greedy_sampling)
        t_gen, t = t_gen + time.perf_counter() - t, time.perf_counter()
        g_scores, g_per = score_groups(g_groups, cfg.rewards)  # [len(chunk)]
        greedy = [_completion_rows(g, g_scores, g_per, i)[0] for i, g in enumerate(g_groups)]
        t_score += time.perf_counter() - t
    lines, stats = [], []
    for i, (it, group) in enumerate(zip(chunk, groups)):
        rows = _completion_rows(group, scores, per, i * cfg.n)
        g = greedy[i]
        stats.append(item_stats([r["reward"] for r in rows], threshold=cfg.threshold, pass1=cfg.pass1,
                                greedy=g["reward"] if g is not None else None))
        lines.append({"id": it.id, "seed": seeds[i], "samples": rows, "greedy": g, "stats": stats[-1].to_dict()})
    return lines, stats, {"time/generate": t_gen, "time/score": t_score}


def sample_items(engine: RolloutEngine, items: Sequence[Item], cfg: CurateConfig, log: ResultLog,
                 harness: RunHarness, progress: Progress, first_step: int = 0) -> int:
    """Sample, score and append each item's line to `log`, one batch per harness step (logged to metrics.jsonl),
    until done or out of time; returns the items done. Steps are numbered on from `first_step`."""
    todo = list(items)

    def step_fn(step: int, position: int) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        chunk = todo[position : position + cfg.batch_size]
        lines, stats, times = sample_batch(engine, chunk, cfg)
        log.write(lines)  # durable before the step counts: this log is curate's checkpoint
        for st in stats:
            progress.add(st)
        return {**progress.record(), **times}, [], position + len(chunk)

    steps = harness.loop(first_step, 0, step_fn, save=None, validate=None, desc="curate", postfix="mean_reward")
    return min(len(todo), (steps - first_step) * cfg.batch_size)


def _build_engine(cfg: CurateConfig, info: DistInfo) -> RolloutEngine:
    from vlrl.models.loading import load_model_and_processor

    model: Any
    model, processor = load_model_and_processor(cfg.model, DTYPES[cfg.dtype], cfg.min_pixels, cfg.max_pixels)
    model.to(info.device).eval()
    kwargs: dict[str, Any] = {"config": cfg.vllm} if cfg.rollout_engine == "vllm" else {}
    return make_engine(cfg.rollout_engine, model, processor, device=info.device, **kwargs)


def _sample(cfg: CurateConfig, info: DistInfo, out: Path, mine: list[Item], progress: Progress) -> int:
    """This rank's share of the items still to sample, on the run harness; returns the items sampled."""
    if not mine:
        return 0
    engine = _build_engine(cfg, info)
    first = last_logged_step(out / "metrics.jsonl") if info.is_main else 0
    n_batches = math.ceil(len(mine) / cfg.batch_size)
    # no checkpoint to save (the result log is one) and one metrics line per batch; min_steps=1: every
    # invocation samples at least one batch, so re-running under the same budget always gets further
    schedule = Schedule(max_steps=first + n_batches, max_seconds=cfg.max_seconds, save_every=0,
                        keep_checkpoints=0, log_every=1, eval_every=0, min_steps=1)
    try:
        harness = RunHarness(out, info, schedule, report_to=cfg.report_to, config=cfg)
        with ResultLog(part_path(out, info.rank)) as log:
            harness.start_clock()  # the budget counts this invocation's sampling (the model is loaded)
            return sample_items(engine, mine, cfg, log, harness, progress, first_step=first)
    finally:
        close_engine(engine)  # a vllm engine's worker ends with the sampling


def run_curate(cfg: CurateConfig) -> dict[str, Any]:
    """Sample what is not yet sampled, then (rank 0) merge, filter and report. Returns the report on rank 0 when
    every item is sampled; {} on other ranks and when the time budget stopped the run first (report.json then
    says how far it got, and re-running the same command continues)."""
    t0 = time.perf_counter()
    info = init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    check_trackers(cfg.report_to)  # an unknown tracker or a missing library fails before any work
    items = load_items(cfg)  # bad data fails before the model loads
    with hold_run_dir(out, info):  # one run at a time in out, refused before it reads or writes there
        report = _curate(cfg, info, out, items, t0)
    barrier()
    cleanup()
    return report


def _curate(cfg: CurateConfig, info: DistInfo, out: Path, items: list[Item], t0: float) -> dict[str, Any]:
    """`run_curate` in its locked run directory."""
    done = read_results(out) if info.is_main else {}
    changes = check_resumable(cfg, out, bool(broadcast_object(bool(done))))
    barrier()
    if info.is_main:
        write_config(out, cfg, changes, [])
    todo_ids = broadcast_object([it.id for it in items if it.id not in done])
    assert isinstance(todo_ids, list)
    todo = set(todo_ids)
    mine = [it for it in items if it.id in todo][info.rank :: info.world_size]
    progress = Progress(total=len(items) - len(todo) + len(mine))
    for it in items:  # rank 0's running means start from the items finished before (empty elsewhere)
        if it.id in done:
            progress.add(stats_of(done[it.id], cfg.threshold, cfg.pass1))
    t_sample = time.perf_counter()
    sampled = _sample(cfg, info, out, mine, progress)
    t_sample = time.perf_counter() - t_sample
    barrier()
    report: dict[str, Any] = {}
    if info.is_main:
        ids = [it.id for it in items]
        results = merge_parts(out, ids)
        extra = {"n": cfg.n, "model": cfg.model, "data": cfg.data, "rewards": [to_dict(r) for r in cfg.rewards],
                 "items_sampled_this_run": len(todo), "items_sampled_rank0": sampled,
                 "seconds_sampling": round(t_sample, 2), "seconds": round(time.perf_counter() - t0, 2),
                 "world_size": info.world_size}
        n_done = sum(i in results for i in ids)
        if n_done == len(ids):
            report = finish([it.original for it in items], results, cfg.filter_spec, out, extra)
        else:
            extra["items_sampled_this_run"] = n_done - (len(ids) - len(todo))
            finish_partial(out, n_done, len(ids), {**extra, "max_seconds": cfg.max_seconds})
            print(f"curate: time budget reached with {n_done} of {len(ids)} items sampled; "
                  "re-run the same command to continue")
    return report
