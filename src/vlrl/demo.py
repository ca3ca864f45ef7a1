"""`make demo`: build the tiny model -> synthetic tasks -> align -> full SFT -> RL -> evaluate held-out splits.

SFT trains on `sft_tasks` (a task in `sft_items_by_task` on only N items, balanced over its answers); RL starts
from the SFT checkpoint and trains on `rl_tasks` (which may include a task SFT demonstrated little or not at all:
the reward carries it); `sft_more` is the control: the SFT checkpoint trained further on its own data for the
same wall time as the RL stage. Each stage calls the same functions as the `vlrl` commands, with the recipes
shipped in the package (`vlrl.recipes_dir()`, `recipes/` in a checkout); every stage's time is printed, and the
summary goes to `{out}/summary.json`; `{out}/report.html` (`vlrl.report`, when plotly is installed) shows the
SFT, RL and sft_more runs' curves side by side, the summary and RL's rollouts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlrl import recipes_dir
from vlrl.config import load_config, save_config
from vlrl.data.loading import load_samples
from vlrl.data.synth import get_task, write_split
from vlrl.eval.evaluate import evaluate_samples, write_results
from vlrl.eval.report import format_table
from vlrl.models.build import init_model
from vlrl.models.loading import load_model_and_processor
from vlrl.train.rl import run_rl
from vlrl.train.rl_config import RLConfig
from vlrl.train.sft import SFTConfig, run_sft


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    arch: str = "qwen2-vl"
    size: str = "tiny"
    tasks: list[str] = field(default_factory=lambda: ["counting", "chart", "chart_grey"])  # generated and evaluated
    sft_tasks: list[str] = field(default_factory=lambda: ["counting", "chart", "chart_grey"])  # trained by SFT
    rl_tasks: list[str] = field(default_factory=lambda: ["chart", "chart_grey"])  # trained by RL (a subset)
    n_train: int = 2000
    n_train_by_task: dict[str, int] = field(default_factory=lambda: {"counting": 4000})  # overrides n_train per task
    task_params: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"counting": {"max_count": 5, "min_radius": 8, "max_radius": 10}})
    sft_items_by_task: dict[str, int] = field(default_factory=lambda: {"chart_grey": 8})  # SFT: N items only
    n_val: int = 300
    n_test: int = 1000
    seed: int = 0
    align_recipe: str = "tiny-align.yaml"
    sft_recipe: str = "tiny-sft.yaml"
    rl_recipe: str = "tiny-grpo.yaml"
    rl: bool = True  # false: stop after SFT (no RL, no sft_more)
    eval_batch_size: int = 128
    max_new_tokens: int = 8
    threads: int = 0  # 0: torch's default (all cores); 1 when other jobs share the cores


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
            write_split(task, n, seed=cfg.seed + i, out_dir=root, split=split, **cfg.task_params.get(task, {}))


def split_paths(root: Path, tasks: list[str], split: str) -> list[str]:
    return [str(root / t / f"{split}.jsonl") for t in tasks]


def balanced_subset(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n rows taken round-robin over the answers (in order of first appearance), each answer's rows in file
    order: a few demonstrations cover every answer instead of whichever the shuffled split put first."""
    queues: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        queues.setdefault(str(row["answer"]), []).append(row)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < n and any(len(q) > depth for q in queues.values()):
        picked += [q[depth] for q in queues.values() if len(q) > depth][: n - len(picked)]
        depth += 1
    return picked


def sft_paths(cfg: DemoConfig, root: Path) -> list[str]:
    """SFT's training files: a task in `sft_items_by_task` is demonstrated by N items of its train split only
    (`{task}/sft.jsonl`, the same images; `balanced_subset`), while RL prompts from the whole split."""
    paths = []
    for task in cfg.sft_tasks:
        train = root / task / "train.jsonl"
        n = cfg.sft_items_by_task.get(task)
        if n is not None:
            rows = balanced_subset(read_jsonl(train), n)
            train = root / task / "sft.jsonl"
            train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths.append(str(train))
    return paths


def sft_stage(recipe: str, model: Path, data: list[str], out: Path, **over: Any) -> Path:
    overrides = [f"model={model}", f"data=[{', '.join(data)}]", f"out={out}"]
    overrides += [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in over.items()]
    cfg = load_config(SFTConfig, recipes_dir() / recipe, overrides)
    return run_sft(cfg)


def rl_stage(recipe: str, model: Path, data: list[str], val: list[str], sft_data: list[str], out: Path) -> Path:
    """RL from the SFT checkpoint; `sft_data` (SFT's own training data) is what the recipe's demonstration
    replay (`replay:`) draws from."""
    overrides = [f"model={model}", f"data=[{', '.join(data)}]", f"validation.data=[{', '.join(val)}]",
                 f"out={out}", f"replay.data=[{', '.join(sft_data)}]"]
    return run_rl(load_config(RLConfig, recipes_dir() / recipe, overrides))


def sft_more_stage(recipe: str, sft: Path, data: list[str], out: Path, seconds: float) -> Path:
    """The equal-time control: the SFT checkpoint trained further on its own data with its own recipe for
    `seconds`, at the learning rate the SFT run ended with, held constant (as if SFT had simply run longer;
    a fresh warm-up to the peak rate would first undo some of what SFT reached)."""
    sft_cfg = load_config(SFTConfig, recipes_dir() / recipe, [f"model={sft}", f"data=[{', '.join(data)}]", f"out={out}"])
    end_lr = sft_cfg.lr * sft_cfg.min_lr_ratio
    return sft_stage(recipe, sft, data, out, max_steps=1_000_000, max_seconds=round(seconds, 1), eval_every=0,
                     lr=end_lr, min_lr_ratio=1.0, warmup_steps=0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_history(run: Path) -> list[float]:
    """val_accuracy of each evaluation in a run's metrics.jsonl, in order."""
    return [r["val_accuracy"] for r in read_jsonl(run / "metrics.jsonl") if "val_accuracy" in r]


def reward_trend(run: Path, k: int = 10) -> dict[str, Any]:
    """Mean reward over the first and the last k logged RL steps. The policy's own reward is
    `reward/sampled_mean` (every sampled completion); `reward/mean` (the rows kept by dynamic sampling, which
    drops the groups the policy already gets all right) is biased downwards as the policy improves, so it is
    reported beside it (`kept_first`, `kept_last`)."""
    records = read_jsonl(run / "metrics.jsonl")
    key = "reward/sampled_mean" if any("reward/sampled_mean" in r for r in records) else "reward/mean"
    rewards = [r[key] for r in records if key in r]
    if not rewards:
        return {}
    k = max(1, min(k, len(rewards) // 2))
    out: dict[str, Any] = {"key": key, "first": round(sum(rewards[:k]) / k, 4), "last": round(sum(rewards[-k:]) / k, 4),
                           "steps": len(rewards)}
    kept = [r["reward/mean"] for r in records if "reward/mean" in r]
    if key != "reward/mean" and len(kept) == len(rewards):
        out.update(kept_first=round(sum(kept[:k]) / k, 4), kept_last=round(sum(kept[-k:]) / k, 4))
    return out


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
    for name, subset, among in (("sft_tasks", cfg.sft_tasks, "tasks"), ("rl_tasks", cfg.rl_tasks if cfg.rl else [], "tasks"),
                                ("task_params", list(cfg.task_params), "tasks"),
                                ("sft_items_by_task", list(cfg.sft_items_by_task), "sft_tasks")):
        unknown = sorted(set(subset) - set(getattr(cfg, among)))
        if unknown:
            raise ValueError(f"{name} {unknown} are not among {among} {getattr(cfg, among)}")
    for task, n in cfg.sft_items_by_task.items():
        if n < 1:
            raise ValueError(f"sft_items_by_task.{task} must be >= 1, got {n}")
    for task, params in cfg.task_params.items():
        get_task(task).params(params)  # an unknown parameter fails here, before anything is built
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo.yaml")
    st = Stages()
    data = out / "data"
    base = st.run("build model", init_model, cfg.arch, cfg.size, out / "model-base", seed=cfg.seed)
    st.run("synthetic data", make_data, cfg, data)
    train, val = sft_paths(cfg, data), split_paths(data, cfg.sft_tasks, "val")
    test = split_paths(data, cfg.tasks, "test")
    acc: dict[str, dict[str, float]] = {}
    acc["base"] = st.run("eval base", evaluate_tasks, cfg, base, test, out / "eval" / "base.json")
    aligned = st.run("sft align", sft_stage, cfg.align_recipe, base, train, out / "align")
    sft = st.run("sft full", sft_stage, cfg.sft_recipe, aligned, train, out / "sft", val_data=val)
    acc["sft"] = st.run("eval sft", evaluate_tasks, cfg, sft, test, out / "eval" / "sft.json")
    checkpoints = {"base": str(base), "sft": str(sft)}
    extra: dict[str, Any] = {"sft_val_accuracy": val_history(out / "sft")}
    if cfg.rl:
        rl_train, rl_val = split_paths(data, cfg.rl_tasks, "train"), split_paths(data, cfg.rl_tasks, "val")
        rl = st.run("rl", rl_stage, cfg.rl_recipe, sft, rl_train, rl_val, train, out / "rl")
        more = st.run("sft more", sft_more_stage, cfg.sft_recipe, sft, train, out / "sft-more", st.times["rl"])
        acc["rl"] = st.run("eval rl", evaluate_tasks, cfg, rl, test, out / "eval" / "rl.json")
        acc["sft_more"] = st.run("eval sft more", evaluate_tasks, cfg, more, test, out / "eval" / "sft_more.json")
        checkpoints.update(rl=str(rl), sft_more=str(more))
        extra["rl_reward"] = reward_trend(out / "rl")
        extra["rl_trained_mean"] = {
            k: round(sum(acc[k][t] for t in cfg.rl_tasks) / len(cfg.rl_tasks), 4) for k in ("sft", "sft_more", "rl")}
    chance = {t: round(get_task(t).chance(**cfg.task_params.get(t, {})), 4) for t in cfg.tasks}
    tasks = {t: {"n": cfg.n_test, "chance": chance[t], **{k: v[t] for k, v in acc.items()},
                 "sft_trained": t in cfg.sft_tasks, **({"rl_trained": t in cfg.rl_tasks} if cfg.rl else {})}
             for t in cfg.tasks}
    summary = {"tasks": tasks, "seconds": st.seconds, "stage_seconds": st.times, **extra, "checkpoints": checkpoints}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    columns = ["task", "n", "chance", *acc, "sft_trained", *(["rl_trained"] if cfg.rl else [])]
    print(format_table([{"task": t, **v} for t, v in tasks.items()], columns))
    for key in ("sft_val_accuracy", "rl_reward", "rl_trained_mean"):
        if key in extra:
            print(f"{key}: {extra[key]}")
    print(f"total {st.seconds:.0f}s -> {out / 'summary.json'}")
    stages = {"sft": out / "sft", **({"rl": out / "rl", "sft_more": out / "sft-more"} if cfg.rl else {})}
    try:  # the demo's figures are in summary.json already: a missing plotting library costs only the page
        from vlrl.report import write_report

        print(f"report: {write_report(out, out / 'report.html', runs=stages, title='vlrl demo')}")
    except ImportError as err:
        print(f"report not written: {err}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlrl.demo")
    p.add_argument("--config", default=str(recipes_dir() / "demo.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value")
    a = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run_demo(load_config(DemoConfig, a.config, a.overrides))


if __name__ == "__main__":
    main()
