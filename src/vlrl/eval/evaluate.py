"""Evaluate a model on datasets with the same answer extraction and correctness check that RL trains with."""

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

from vlrl.config import save_config
from vlrl.data.loading import load_samples
from vlrl.data.sample import Sample
from vlrl.models.loading import load_model_and_processor
from vlrl.rewards.accuracy import score_answer
from vlrl.rewards.extract import extract_answer
from vlrl.rollout.hf import generate_texts
from vlrl.rollout.types import SamplingParams


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
    batch_size: int = 64  # prompts per generate call
    max_new_tokens: int = 32  # answer length limit in tokens
    temperature: float = 0.0  # sampling temperature of the answers (0: greedy)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)

@dataclass
class EvalResult:
    n: int
    accuracy: float
    by_task: dict[str, dict[str, float]]
    by_category: dict[str, dict[str, float]]
    predictions: list[dict[str, Any]] = field(repr=False)
    seconds: float = 0.0


def _category(sample: Sample) -> str:
    """MATH-V `subject`; else the task."""
    return str(sample.metadata.get("subject", sample.task))


def _group(preds: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    acc: dict[str, list[float]] = defaultdict(list)
    for p in preds:
        acc[p[key]].append(p["correct"])
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(acc.items())}


def score_prediction(sample: Sample, completion: str) -> float:
    """1.0 / 0.0 by the problem type's check (grounding: IoU >= 0.5); unscorable counts as wrong."""
    s = score_answer(completion, sample.answer, sample.problem_type, metadata=sample.metadata)
    return float(s is not None and s >= 0.5) if sample.problem_type == "grounding" else float(s or 0.0)


def evaluate_samples(model: Any, processor: Any, samples: Sequence[Sample], *, device: torch.device | str = "cpu",
                     batch_size: int = 64, max_new_tokens: int = 32, temperature: float = 0.0,
                     progress: bool = False) -> EvalResult:
    """Batched generation (prompts sorted by length to limit padding), extraction, scoring."""
    t0 = time.perf_counter()
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].images), len(samples[i].messages[-1]["content"])))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    texts: dict[int, str] = {}
    was_training = model.training
    model.eval()
    for k in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress):
        idx = order[k : k + batch_size]
        outs = generate_texts(model, processor, [samples[i] for i in idx], sampling, device=device)
        texts.update({i: o[0] for i, o in zip(idx, outs)})
    model.train(was_training)
    preds: list[dict[str, Any]] = []
    for i, s in enumerate(samples):
        preds.append({"id": s.id, "task": s.task, "category": _category(s), "problem_type": s.problem_type,
                      "answer": s.answer, "completion": texts[i], "extracted": extract_answer(texts[i]),
                      "correct": score_prediction(s, texts[i])})
    n = len(preds)
    accuracy = sum(float(p["correct"]) for p in preds) / max(1, n)
    return EvalResult(n=n, accuracy=accuracy, by_task=_group(preds, "task"), by_category=_group(preds, "category"),
                      predictions=preds, seconds=time.perf_counter() - t0)


def write_results(result: EvalResult, out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    pred_path = out.with_name(out.stem + ".predictions.jsonl")
    with pred_path.open("w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    summary = {"n": result.n, "accuracy": result.accuracy, "by_task": result.by_task,
               "by_category": result.by_category, "predictions": str(pred_path), "seconds": result.seconds,
               **(extra or {})}
    out.write_text(json.dumps(summary, indent=2))
    return summary


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    save_config(cfg, out.with_name(out.stem + ".config.yaml"))
    samples = load_samples(cfg.data, registry=cfg.registry, template=cfg.template, skip_invalid=cfg.skip_invalid,
                           limit=cfg.limit, system_prompt=cfg.system_prompt)  # bad data fails before the model loads
    model, processor = load_model_and_processor(cfg.model)
    result = evaluate_samples(model, processor, samples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, progress=True)
    return write_results(result, out, {"model": cfg.model, "data": cfg.data})
