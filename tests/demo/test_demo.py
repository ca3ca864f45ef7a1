"""`make demo`'s pipeline on a few items and steps: every stage runs and the summary has every figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlrl import recipes_dir
from vlrl.demo import DemoConfig, run_demo


def _short(recipe: str, tmp: Path, **over: object) -> str:
    cfg = yaml.safe_load((recipes_dir() / recipe).read_text())
    for key, value in over.items():  # a section given in part keeps the recipe's other keys
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = tmp / recipe
    path.write_text(yaml.safe_dump(cfg))
    return str(path)  # absolute: recipes_dir() / path is path


def test_demo_pipeline_writes_every_figure(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), n_train=16, n_train_by_task={}, n_val=4, n_test=6, threads=1,
        task_params={"counting": {"max_count": 3}},
        align_recipe=_short("tiny-align.yaml", tmp_path, max_steps=2),
        sft_recipe=_short("tiny-sft.yaml", tmp_path, max_steps=3, eval_every=3, batch_size=4, micro_batch_size=4),
        rl_recipe=_short("tiny-grpo.yaml", tmp_path, max_steps=2, rollout={"batch_size": 2, "group_size": 2},
                         validation={"every": 0}))
    summary = run_demo(cfg)
    assert summary == json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"counting", "chart", "chart_grey"}
    for task, row in summary["tasks"].items():
        assert row["n"] == 6 and {"base", "sft", "rl", "sft_more"} <= set(row)
        assert row["sft_trained"] == (task in cfg.sft_tasks) and row["rl_trained"] == (task in cfg.rl_tasks)
    assert summary["tasks"]["counting"]["chance"] == 0.3333 and summary["tasks"]["chart"]["chance"] == 0.2857
    answers = {json.loads(line)["answer"] for line in (tmp_path / "demo" / "data" / "counting" / "train.jsonl").open()}
    assert answers == {"1", "2", "3"}  # task_params reached the generator
    assert len(summary["sft_val_accuracy"]) == 1 and summary["rl_reward"]["steps"] == 2
    assert summary["rl_reward"]["key"] == "reward/sampled_mean" and "kept_last" in summary["rl_reward"]
    assert set(summary["rl_trained_mean"]) == {"sft", "sft_more", "rl"}
    for stage in ("rl", "sft more", "eval rl", "eval sft more"):
        assert summary["stage_seconds"][stage] >= 0
    assert Path(summary["checkpoints"]["rl"]).name == "step-2"
    assert Path(summary["checkpoints"]["sft_more"]).is_dir()


def test_bad_task_params_fail_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown parameter.*max_count"):
        run_demo(DemoConfig(out=str(tmp_path / "a"), task_params={"counting": {"max_cnt": 4}}))
    with pytest.raises(ValueError, match=r"task_params \['compare'\] are not among tasks"):
        run_demo(DemoConfig(out=str(tmp_path / "b"), task_params={"compare": {"size": 96}}))
    with pytest.raises(ValueError, match=r"sft_items_by_task \['chart_grey'\] are not among sft_tasks"):
        run_demo(DemoConfig(out=str(tmp_path / "c"), sft_tasks=["counting", "chart"],
                            sft_items_by_task={"chart_grey": 8}))
    with pytest.raises(ValueError, match=r"sft_items_by_task.chart must be >= 1, got 0"):
        run_demo(DemoConfig(out=str(tmp_path / "d"), sft_items_by_task={"chart": 0}))
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_sft_paths_demonstrate_n_items_balanced_over_answers_and_leave_rl_the_whole_split(tmp_path: Path) -> None:
    from vlrl.data.synth import write_split
    from vlrl.demo import sft_paths, split_paths

    for task in ("chart", "chart_grey"):
        write_split(task, 40, seed=1, out_dir=tmp_path, split="train")
    cfg = DemoConfig(tasks=["chart", "chart_grey"], sft_tasks=["chart", "chart_grey"], sft_items_by_task={"chart_grey": 6})
    chart, grey = sft_paths(cfg, tmp_path)
    assert chart == str(tmp_path / "chart" / "train.jsonl") and grey == str(tmp_path / "chart_grey" / "sft.jsonl")
    whole = [json.loads(line) for line in (tmp_path / "chart_grey" / "train.jsonl").read_text().splitlines()]
    picked = [json.loads(line) for line in Path(grey).read_text().splitlines()]
    assert len(whole) == 40 and len(picked) == 6
    # round-robin over the answers in order of first appearance, each answer's items in file order
    order = list(dict.fromkeys(r["answer"] for r in whole))
    assert sorted(order) == ["A", "B", "C", "D"]
    by_answer = {a: [r for r in whole if r["answer"] == a] for a in order}
    expected = [by_answer[a][0] for a in order] + [by_answer[a][1] for a in order[:2]]
    assert picked == expected
    assert split_paths(tmp_path, ["chart_grey"], "train") == [str(tmp_path / "chart_grey" / "train.jsonl")]


def test_balanced_subset_takes_what_there_is_when_an_answer_runs_out() -> None:
    from vlrl.demo import balanced_subset

    rows = [{"answer": a} for a in "AAAAB"]
    assert [r["answer"] for r in balanced_subset(rows, 4)] == ["A", "B", "A", "A"]
    assert balanced_subset(rows, 10) == rows[:1] + rows[4:] + rows[1:4]  # all 5, no repeats
    assert balanced_subset([], 3) == []


def test_reward_trend_reads_the_policy_reward_and_the_kept_rows(tmp_path: Path) -> None:
    from vlrl.demo import reward_trend

    rows = [{"step": i + 1, "reward/sampled_mean": 0.1 * i, "reward/mean": 0.5} for i in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trend = reward_trend(tmp_path, k=2)  # first two: 0.0, 0.1; last two: 0.4, 0.5
    assert trend == {"key": "reward/sampled_mean", "first": 0.05, "last": 0.45, "steps": 6, "kept_first": 0.5,
                     "kept_last": 0.5}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"reward/mean": r["reward/sampled_mean"]}) + "\n"
                                                    for r in rows))
    assert reward_trend(tmp_path, k=3) == {"key": "reward/mean", "first": 0.1, "last": 0.4, "steps": 6}


def test_demo_yaml_matches_the_config_defaults() -> None:
    from vlrl.config import load_config

    assert load_config(DemoConfig, recipes_dir() / "demo.yaml", []) == DemoConfig()
