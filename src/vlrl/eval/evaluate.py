"""Evaluate a model on datasets with the rewards that train it, generating with the rollout engine RL uses.

Per item, `n` completions from a rollout engine (`vlrl.rollout.base.make_engine`, the one RL and curate
use: same stop tokens, vision tokens suppressed; `hf` unless the config says `engine: vllm`): greedy when
temperature is 0, else sampled with the item's seed `mix_seed(seed, position)`, so a sampled evaluation is
reproducible whatever its batches. Each completion is scored with the reward specs
(`vlrl.rewards.registry.combine`; default `accuracy`) and is correct when its weighted reward >= `threshold`; one
no reward could score is wrong. An item's `correct` is the fraction of its
completions that are correct (pass@1, the unbiased estimator; 0 or 1 for n = 1) and, for n > 1, `pass_at_n` is
1 if any is (`vlrl.eval.passk`, the statistics `vlrl curate` uses). `accuracy` is the mean of `correct`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlrl.config import check_names, check_out_path, check_ranges, save_config
from vlrl.data.loading import load_samples
from vlrl.data.sample import Sample
from vlrl.data.templates import TEMPLATES
from vlrl.eval.passk import item_stats, passes
from vlrl.models.loading import load_model_and_processor
from vlrl.rewards.extract import extract_answer
from vlrl.rewards.registry import RewardSpec, combine, specs_or_names
from vlrl.rollout.base import ENGINES, RolloutEngine, make_engine
from vlrl.rollout.sampler import mix_seed
from vlrl.rollout.types import Completion, SamplingParams
from vlrl.rollout.vllm_engine import VLLMConfig


@dataclass
class EvalConfig:
    model: str  # HF model folder (or checkpoint) to evaluate
    data: list[str]  # datasets to evaluate on: registry names or data file paths
    out: str  # results JSON path; OUT.predictions.jsonl and OUT.config.yaml (OUT: its stem) go beside it
    registry: str | None = None  # registry file that dataset names resolve in (null: $VLRL_DATA_REGISTRY)
    template: str = "none"  # prompt template: none | answer | thinking | fast (a registry entry's own wins)
    system_prompt: str | None = None  # replaces (or inserts) each prompt's system turn; null: keep the data's
    skip_invalid: bool = False  # drop invalid data records (counted) instead of stopping at the first
    limit: int | None = None  # first this many records of each dataset; null: all
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy")])  # the rewards that
    #   score a completion, summed with weights, as in the RL config: each {name, weight, kwargs, label}
    reward: list[str] = field(default_factory=list)  # shorthand: reward names, weight 1 (replaces `rewards`)
    threshold: float = 0.5  # a completion is correct when its weighted reward >= threshold (unscorable: wrong)
    n: int = 1  # completions per item; n > 1 (needs temperature > 0) also reports pass@n (any of n correct)
    batch_size: int = 64  # prompts per engine call (batch_size * n completions decode together)
    max_new_tokens: int = 32  # answer length limit in tokens
    temperature: float = 0.0  # sampling temperature of the answers (0: greedy)
    seed: int = 0  # when sampling, the item at position i of the data is sampled with seed mix_seed(seed, i)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    engine: str = "hf"  # rollout engine that generates the answers: hf (in-process generate) | vllm
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # engine vllm: where its worker runs and how
    overwrite: bool = False  # replace the results already at `out` (else an existing `out` is an error: a
    #   finished evaluation is not lost to a repeated command)

    def __post_init__(self) -> None:
        """Refuse names and values no evaluation can use, before anything loads or is written."""
        self.rewards, self.reward = specs_or_names(self.rewards, self.reward), []
        for name in ("n", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_ranges([("temperature", self.temperature, ">= 0"), ("limit", self.limit, ">= 1"),
                      ("seed", self.seed, "in [0, 2**63)"), ("threads", self.threads, ">= 0")])
        check_names([("template", self.template, list(TEMPLATES)), ("engine", self.engine, list(ENGINES))])
        check_vllm("vllm", self.engine, self.vllm)
        check_sampling(self.n, self.temperature)
        if not self.model or not self.data or not all(self.data):
            raise ValueError("model and data must be given (data: at least one dataset)")
        check_out_path("out", self.out, kind="file")
        if Path(self.out).exists() and not self.overwrite:
            raise ValueError(f"out {self.out!r} already holds results; choose another out, or set overwrite=true "
                             "to replace them")


@dataclass
class EvalResult:
    n: int  # items
    accuracy: float  # mean over items of the fraction of their completions that are correct (pass@1)
    by_task: dict[str, dict[str, float]]
    by_category: dict[str, dict[str, float]]
    predictions: list[dict[str, Any]] = field(repr=False)
    seconds: float = 0.0
    samples_per_item: int = 1
    pass_at_n: float | None = None  # fraction of items with a correct completion (samples_per_item > 1)


def check_vllm(key: str, engine: str, v: VLLMConfig) -> None:
    """The vLLM engine's settings at config time (`key`: where they sit, e.g. `rollout.vllm`), so that a bad one is
    refused before a model loads: the numeric ranges always, the url's scheme, and, when `engine` is vllm and no url
    is given (colocated), that the vLLM environment's Python exists."""
    check_ranges([(f"{key}.startup_timeout", v.startup_timeout, "> 0"),
                  (f"{key}.request_timeout", v.request_timeout, "> 0"), (f"{key}.retries", v.retries, ">= 0"),
                  (f"{key}.gpu_memory_utilization", v.gpu_memory_utilization, "in (0, 1]"),
                  (f"{key}.max_images", v.max_images, ">= 1"), (f"{key}.max_model_len", v.max_model_len, ">= 0")])
    if v.url and not v.url.startswith(("http://", "https://")):
        raise ValueError(f"{key}.url must be http://host:port or https://host:port, got {v.url!r}")
    if engine == "vllm" and not v.url and not Path(v.python).is_file():
        raise ValueError(f"{key}.python: no vLLM environment at {v.python!r}; build it with `make vllm-env` "
                         f"(scripts/vllm-env.sh) and give its Python, or give {key}.url of a running worker")


def check_sampling(n: int, temperature: float) -> None:
    if n > 1 and temperature <= 0:
        raise ValueError(f"n={n} completions per item need temperature > 0 (greedy ones would all be equal)")


def _category(sample: Sample) -> str:
    """MATH-V `subject`; else the task."""
    return str(sample.metadata.get("subject", sample.task))


def _rates(preds: list[dict[str, Any]], samples_per_item: int) -> dict[str, float]:
    acc = sum(float(p["correct"]) for p in preds) / max(1, len(preds))
    out = {"n": len(preds), "accuracy": acc}
    if samples_per_item > 1:
        out.update(pass_at_1=acc, pass_at_n=sum(p["pass_at_n"] for p in preds) / max(1, len(preds)))
    return out


def _group(preds: list[dict[str, Any]], key: str, samples_per_item: int) -> dict[str, dict[str, float]]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        rows[p[key]].append(p)
    return {k: _rates(v, samples_per_item) for k, v in sorted(rows.items())}


def completion_rewards(texts: list[str], samples: list[Sample], specs: Sequence[RewardSpec],
                       lengths: list[int] | None = None) -> list[float | None]:
    """The weighted reward of each (completion, sample) pair; None where no reward could score it. `lengths`
    (tokens, stop token included) reach the rewards that read them (DAPO's `overlong`), as in training."""
    runtime: dict[str, Any] = {} if lengths is None else {"completion_lengths": lengths}
    total, per_reward, _ = combine(specs, texts, samples, **runtime)
    return [None if all(v[i] is None for v in per_reward.values()) else total[i] for i in range(len(total))]


def score_prediction(sample: Sample, completion: str, rewards: Sequence[RewardSpec] | None = None,
                     threshold: float = 0.5) -> float:
    """1.0 if `completion` is correct for `sample` (weighted reward >= threshold; default: `accuracy`), else 0.0."""
    reward = completion_rewards([completion], [sample], rewards or [RewardSpec("accuracy")])[0]
    return float(passes(reward, threshold))


def generate_completions(engine: RolloutEngine, samples: Sequence[Sample], n: int, sampling: SamplingParams, *,
                         seed: int = 0, batch_size: int = 64, progress: bool = False) -> list[list[Completion]]:
    """`n` completions per sample, in the samples' order. Prompts go to the engine `batch_size` at a time, sorted
    by length to limit padding; when sampling, the sample at position i is seeded with mix_seed(seed, i)."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].images), len(samples[i].messages[-1]["content"])))
    out: dict[int, list[Completion]] = {}
    for k in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress):
        idx = order[k : k + batch_size]
        seeds = None if sampling.greedy else [mix_seed(seed, i) for i in idx]
        groups = engine.generate([samples[i] for i in idx], n, sampling, seeds=seeds)
        out.update({i: g.completions for i, g in zip(idx, groups)})  # the groups' encoded prompts are dropped
    return [out[i] for i in range(len(samples))]


def _prediction(sample: Sample, completions: list[Completion], rewards: list[float | None],
                threshold: float) -> dict[str, Any]:
    stats = item_stats(rewards, threshold=threshold, pass1="first")
    pred: dict[str, Any] = {"id": sample.id, "task": sample.task, "category": _category(sample),
                            "problem_type": sample.problem_type, "answer": sample.answer}
    if len(completions) == 1:
        text = completions[0].text
        return {**pred, "completion": text, "extracted": extract_answer(text), "reward": rewards[0],
                "correct": stats.pass_rate}
    return {**pred, "completions": [c.text for c in completions], "rewards": rewards, "correct": stats.pass_rate,
            "pass_at_n": stats.pass_at_n}


def evaluate_samples(model: Any, processor: Any, samples: Sequence[Sample], *, device: torch.device | str | None = None,
                     batch_size: int = 64, max_new_tokens: int = 32, temperature: float = 0.0, n: int = 1,
                     seed: int = 0, rewards: Sequence[RewardSpec] | None = None, threshold: float = 0.5,
                     progress: bool = False, engine: RolloutEngine | None = None) -> EvalResult:
    """Generate `n` completions per sample, score them, aggregate per task and category (see the module
    docstring). `engine`: the rollout engine that generates (None: an `hf` engine on `model` for this call; a given
    one is the caller's to close). `device`: where the model runs (None: its parameters' device)."""
    check_sampling(n, temperature)
    t0 = time.perf_counter()
    if engine is None:
        engine = make_engine("hf", model, processor, device=device, reload_weights=False)  # weights fixed for the call
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    completions = generate_completions(engine, samples, n, sampling, seed=seed, batch_size=batch_size,
                                       progress=progress)
    rows = [s for s, cs in zip(samples, completions) for _ in cs]
    flat = [c for cs in completions for c in cs]
    scores = completion_rewards([c.text for c in flat], rows, rewards or [RewardSpec("accuracy")],
                                [c.length for c in flat])
    preds = [_prediction(s, cs, scores[i * n : (i + 1) * n], threshold)
             for i, (s, cs) in enumerate(zip(samples, completions))]
    overall = _rates(preds, n)
    return EvalResult(n=len(preds), accuracy=overall["accuracy"], by_task=_group(preds, "task", n),
                      by_category=_group(preds, "category", n), predictions=preds,
                      seconds=time.perf_counter() - t0, samples_per_item=n, pass_at_n=overall.get("pass_at_n"))


def write_results(result: EvalResult, out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    pred_path = out.with_name(out.stem + ".predictions.jsonl")
    with pred_path.open("w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    summary = {"n": result.n, "accuracy": result.accuracy, "by_task": result.by_task,
               "by_category": result.by_category, "predictions": str(pred_path), "seconds": result.seconds}
    if result.samples_per_item > 1:
        summary.update(samples_per_item=result.samples_per_item, pass_at_1=result.accuracy,
                       pass_at_n=result.pass_at_n)
    summary.update(extra or {})
    out.write_text(json.dumps(summary, indent=2))
    return summary


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    samples = load_samples(cfg.data, registry=cfg.registry, template=cfg.template, skip_invalid=cfg.skip_invalid,
                           limit=cfg.limit, system_prompt=cfg.system_prompt)  # bad data fails before the model loads
    model, processor = load_model_and_processor(cfg.model)
    engine = make_engine("vllm", model, processor, config=cfg.vllm) if cfg.engine == "vllm" else None  # None:
    #   evaluate_samples' own hf engine
    try:
        save_config(cfg, out.with_name(out.stem + ".config.yaml"))  # once data, model and engine are there: a
        #   refused evaluation writes nothing
        result = evaluate_samples(model, processor, samples, batch_size=cfg.batch_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.n,
                                  seed=cfg.seed, rewards=cfg.rewards, threshold=cfg.threshold, progress=True,
                                  engine=engine)
    finally:
        close_engine(engine)
    return write_results(result, out, {"model": cfg.model, "data": cfg.data})


def close_engine(engine: Any) -> None:
    """Stop what an engine runs beside this process (the `vllm` engine's colocated worker); `hf` has nothing."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()
