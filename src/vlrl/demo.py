"""`make demo`: build the tiny model -> synthetic tasks -> align -> full SFT -> evaluate held-out splits.

Each stage calls the same functions as the `vlrl` commands, with the recipes in `recipes/`; every
stage's time is printed, and the summary goes to `{out}/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrl.config import load_config, save_config
from vlrl.data.synth import get_task, write_split
from vlrl.eval.evaluate import evaluate_samples, write_results
from vlrl.eval.report import format_table
from vlrl.models.build import init_model
from vlrl.models.loading import load_model_and_processor
from vlrl.train.batches import load_samples
from vlrl.train.sft import SFTConfig, run_sft

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    arch: str = "qwen2-vl"
    size: str = "tiny"
    tasks: list[str] = field(default_factory=lambda: ["counting", "chart", "compare", "grounding"])  # evaluated
    sft_tasks: list[str] = field(default_factory=lambda: ["counting", "chart"])  # trained by SFT (a subset)
    n_train: int = 4000
    n_train_by_task: dict[str, int] = field(default_factory=dict)  # overrides n_train per task (the SFT mix)
    n_val: int = 200
    n_test: int = 1000
    seed: int = 0
    align_recipe: str = "tiny-align.yaml"
    sft_recipe: str = "tiny-sft.yaml"
    eval_batch_size: int = 128
    max_new_tokens: int = 24
    threads: int = 0


class Stages:
    """Times each stage and prints it."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn(*args, **kw)
        self.times[name] = round(time.perf_counter() - t, 1)
        print(f"== {name} done in {self.times[name]:.1f}s", flush=True)
        return result

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def make_data(cfg: DemoConfig, root: Path) -> None:
    for i, task in enumerate(cfg.tasks):
        n_train = cfg.n_train_by_task.get(task, cfg.n_train)
        for split, n in (("train", n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
            write_split(task, n, seed=cfg.seed + i, out_dir=root, split=split)


def split_paths(root: Path, tasks: list[str], split: str) -> list[str]:
    return [str(root / t / f"{split}.jsonl") for t in tasks]


def sft_stage(recipe: str, model: Path, data: list[str], out: Path, **over: Any) -> Path:
    overrides = [f"model={model}", f"data=[{', '.join(data)}]", f"out={out}"]
    overrides += [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in over.items()]
    cfg = load_config(SFTConfig, RECIPES / recipe, overrides)
    return run_sft(cfg)


def evaluate_tasks(cfg: DemoConfig, model_dir: Path, test: list[str], out: Path) -> dict[str, float]:
    model, processor = load_model_and_processor(model_dir)
    samples = load_samples(test)
    result = evaluate_samples(model, processor, samples, batch_size=cfg.eval_batch_size,
                              max_new_tokens=cfg.max_new_tokens, progress=True)
    write_results(result, out, {"model": str(model_dir)})
    return {task: row["accuracy"] for task, row in result.by_task.items()}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo.yaml")
    st = Stages()
    base = st.run("build model", init_model, cfg.arch, cfg.size, out / "model-base", seed=cfg.seed)
    st.run("synthetic data", make_data, cfg, out / "data")
    unknown = sorted(set(cfg.sft_tasks) - set(cfg.tasks))
    if unknown:
        raise ValueError(f"sft_tasks {unknown} are not among tasks {cfg.tasks}")
    train, val = split_paths(out / "data", cfg.sft_tasks, "train"), split_paths(out / "data", cfg.sft_tasks, "val")
    test = split_paths(out / "data", cfg.tasks, "test")
    acc_base = st.run("eval base", evaluate_tasks, cfg, base, test, out / "eval" / "base.json")
    aligned = st.run("sft align", sft_stage, cfg.align_recipe, base, train, out / "align")
    sft = st.run("sft full", sft_stage, cfg.sft_recipe, aligned, train, out / "sft", val_data=val)
    acc_sft = st.run("eval sft", evaluate_tasks, cfg, sft, test, out / "eval" / "sft.json")
    tasks = {t: {"n": cfg.n_test, "chance": round(get_task(t).chance(), 4), "base": acc_base[t], "sft": acc_sft[t],
                 "sft_trained": t in cfg.sft_tasks} for t in cfg.tasks}
    summary = {"tasks": tasks, "seconds": st.seconds, "stage_seconds": st.times,
               "checkpoints": {"base": str(base), "sft": str(sft)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [{"task": t, **v} for t, v in tasks.items()]
    print(format_table(rows, ["task", "n", "chance", "base", "sft", "sft_trained"]))
    print(f"total {st.seconds:.0f}s -> {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlrl.demo")
    p.add_argument("--config", default=str(RECIPES / "demo.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value")
    a = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run_demo(load_config(DemoConfig, a.config, a.overrides))


if __name__ == "__main__":
    main()
