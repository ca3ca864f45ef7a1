"""`vlrl eval` scores every item of the real benchmarks in ../shared/data, per subject."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlrl.data.sample import Sample
from vlrl.eval.evaluate import EvalConfig, run_eval, score_prediction

pytestmark = pytest.mark.slow


def _check_summary(summary: dict, n: int) -> list[dict]:
    preds = [json.loads(line) for line in open(summary["predictions"])]
    assert summary["n"] == len(preds) == n
    assert summary["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / n)
    for cat, row in summary["by_category"].items():
        mine = [p["correct"] for p in preds if p["category"] == cat]
        assert row["n"] == len(mine) and row["accuracy"] == pytest.approx(sum(mine) / len(mine))
    return preds


def test_mathv_testmini_all_304_items_by_subject(tiny_model_dir, mathv_dir, tmp_path):
    path = mathv_dir / "testmini.jsonl"
    summary = run_eval(EvalConfig(model=str(tiny_model_dir), data=[str(path)], out=str(tmp_path / "mathv.json"),
                                  max_new_tokens=6, batch_size=64))
    preds = _check_summary(summary, 304)
    subjects = Counter(json.loads(line)["subject"] for line in path.open())
    assert {k: v["n"] for k, v in summary["by_category"].items()} == dict(subjects)
    assert json.loads((tmp_path / "mathv.json").read_text())["n"] == 304
    assert all(isinstance(p["completion"], str) for p in preds)


def test_nlvr_dev150_all_items(tiny_model_dir, nlvr_dir, tmp_path):
    path = nlvr_dir / "dev150.jsonl"
    summary = run_eval(EvalConfig(model=str(tiny_model_dir), data=[str(path)], out=str(tmp_path / "nlvr.json"),
                                  max_new_tokens=4, batch_size=75))
    _check_summary(summary, 150)
    assert summary["by_task"] == {"nlvr": summary["by_category"]["nlvr"]}


def _sample(problem_type: str, answer: str, **meta) -> Sample:
    return Sample(id="x", images=[], messages=[{"role": "user", "content": "q"}], answer=answer,
                  problem_type=problem_type, metadata=meta)


@pytest.mark.parametrize("ptype,answer,completion,meta,expected", [
    ("numerical", "3", "<answer>3</answer>", {}, 1.0),
    ("numerical", "3", "<answer>4</answer>", {}, 0.0),
    ("multiple_choice", "B", "<answer>(B)</answer>", {"options": ["A", "B", "C", "D"]}, 1.0),
    ("yes_no", "yes", "<answer>Yes</answer>", {}, 1.0),
    ("yes_no", "no", "garbage", {}, 0.0),
    # IoU([10,10,30,30], [12,10,32,30]) = 360/440 = 0.82 >= 0.5
    ("grounding", "[10, 10, 30, 30]", "<answer>[12, 10, 32, 30]</answer>", {"image_size": [112, 112]}, 1.0),
    # IoU([10,10,30,30], [20,10,40,30]) = 200/600 = 0.33 < 0.5
    ("grounding", "[10, 10, 30, 30]", "<answer>[20, 10, 40, 30]</answer>", {"image_size": [112, 112]}, 0.0),
])
def test_score_prediction_hand_cases(ptype, answer, completion, meta, expected):
    assert score_prediction(_sample(ptype, answer, **meta), completion) == expected
