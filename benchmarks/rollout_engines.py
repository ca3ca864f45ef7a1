"""Rollout throughput of the `hf` and `vllm` engines, side by side in one run.

    .venv/bin/python benchmarks/rollout_engines.py --size small --vllm-python .venv-vllm/bin/python \
        --out benchmarks/results/rollout_engines.json

The built-in model of `--size` (random weights, so completions run to their token limit: every row decodes the
same number of tokens in both engines), 4 prompts with an image each (the chart task) x 8 samples, seeded, for
each of `--new-tokens` (default 32 and 256): per engine, `--repeats` timed `generate` calls after one warm-up
call; reported per setting are the median seconds per call, completion tokens per second and the ratio
vllm / hf. Also the vLLM worker's start-up time (it loads once per run) and the time of one `sync_weights`
(after every RL step). Both engines use the same threads: `--threads` for torch in this process, and the same
number for the worker (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlrl.data.loading import load_samples
from vlrl.data.synth import write_split
from vlrl.models.build import init_model
from vlrl.models.loading import load_model_and_processor
from vlrl.rollout.base import make_engine
from vlrl.rollout.types import SamplingParams
from vlrl.rollout.vllm_engine import VLLMConfig


def time_engine(engine: Any, samples: list[Any], n: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    seeds = list(range(len(samples)))
    engine.generate(samples, n, sampling, seeds=seeds)  # warm-up: first-call allocations, the worker's caches
    seconds, tokens = [], []
    for r in range(repeats):
        t = time.perf_counter()
        groups = engine.generate(samples, n, sampling, seeds=[s + 1000 * (r + 1) for s in seeds])
        seconds.append(time.perf_counter() - t)
        tokens.append(sum(c.length for g in groups for c in g.completions))
    med = statistics.median(seconds)
    return {"seconds": [round(s, 3) for s in seconds], "median_seconds": round(med, 3),
            "tokens_per_call": tokens, "tokens_per_second": round(statistics.median(tokens) / med, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[32, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    p.add_argument("--out", default=None, help="results JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the worker inherits it
    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-engines-"))
    model_dir = init_model("qwen2-vl", a.size, work / "model", seed=0)
    write_split("chart", a.prompts, seed=0, out_dir=work / "data", split="test")
    samples = load_samples([str(work / "data" / "chart" / "test.jsonl")])[: a.prompts]
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {"size": a.size, "parameters": n_params, "prompts": a.prompts, "samples": a.samples,
                               "threads": a.threads, "repeats": a.repeats, "settings": {}}
    t = time.perf_counter()
    vllm = make_engine("vllm", model, processor, config=VLLMConfig(python=a.vllm_python))
    results["vllm_start_seconds"] = round(time.perf_counter() - t, 1)
    try:
        t = time.perf_counter()
        vllm.sync_weights(model)
        results["vllm_sync_seconds"] = round(time.perf_counter() - t, 3)
        hf = make_engine("hf", model, processor)
        for new_tokens in a.new_tokens:
            row = {"hf": time_engine(hf, samples, a.samples, new_tokens, a.repeats),
                   "vllm": time_engine(vllm, samples, a.samples, new_tokens, a.repeats)}
            row["vllm_over_hf_tokens_per_second"] = round(
                row["vllm"]["tokens_per_second"] / row["hf"]["tokens_per_second"], 2)
            results["settings"][str(new_tokens)] = row
            print(f"{new_tokens} new tokens: hf {row['hf']['tokens_per_second']} tok/s, "
                  f"vllm {row['vllm']['tokens_per_second']} tok/s, ratio {row['vllm_over_hf_tokens_per_second']}",
                  flush=True)
    finally:
        vllm.close()  # type: ignore[attr-defined]
    print(json.dumps(results, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
