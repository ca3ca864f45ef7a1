"""score_file: a generated 1,000-line file whose summary equals a recomputation from the output lines."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from vlrl.rewards.registry import RewardSpec
from vlrl.rewards.score import ScoreInputError, score_file


def _row(i: int, rng: random.Random) -> dict[str, Any]:
    kind = i % 8
    if kind == 0:
        return {"completion": f"<think>t</think><answer>{rng.choice('ABCD')}</answer>", "answer": "B",
                "problem_type": "multiple_choice", "options": ["a", "b", "c", "d"]}  # fmt: skip
    if kind == 1:
        return {
            "completion": f"The answer is {rng.randint(1, 4)}.",
            "answer": "3",
            "problem_type": "numerical",
        }
    if kind == 2:
        return {
            "completion": f"\\boxed{{\\frac{{{rng.randint(1, 2)}}}{{2}}}}",
            "answer": "0.5",
            "problem_type": "math",
        }
    if kind == 3:
        return {"completion": rng.choice(["Yes.", "no"]), "answer": "yes", "problem_type": "yes_no"}
    if kind == 4:
        return {"completion": rng.choice(["hello world", "helo world", "bye"]), "answer": "hello world",
                "problem_type": "ocr"}  # fmt: skip
    if kind == 5:
        return {"completion": rng.choice(["The cat.", "a dog"]), "answer": "cat", "problem_type": "free_form"}
    if kind == 6:
        x = rng.randint(0, 450)  # x > 300 misses at IoU 0.5
        return {"completion": f"<answer>[{x}, 100, 500, 500]</answer>", "answer": [100, 50, 500, 250],
                "problem_type": "grounding", "coord_space": "norm1000", "image_size": [1000, 500], "id": f"g{i}"}  # fmt: skip
    return {
        "completion": "<answer>7</answer>",
        "answer": "seven",
        "problem_type": "numerical",
    }  # gold unscorable


def _write(path: Path, rows: list[Any]) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def _recompute(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[float | None]] = {}
    for line in lines:
        groups.setdefault(line["problem_type"], []).append(line["reward"])
    out = {}
    for pt, values in groups.items():
        scored = [v for v in values if v is not None]
        out[pt] = {"n": len(values), "mean_reward": sum(scored) / len(scored) if scored else None,
                   "n_none": len(values) - len(scored)}  # fmt: skip
    return out


def test_score_file_1000_lines_summary_matches_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(0)
    rows = [_row(i, rng) for i in range(1000)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows[:500] + [""] + rows[500:])  # a blank line is skipped
    start = time.perf_counter()
    summary = score_file(src, dst)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, elapsed  # measured ~0.6 s on 2 cores
    lines = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 1000 and summary["n"] == 1000
    for row, line in zip(rows, lines):
        assert {k: line[k] for k in row} == row
        assert "extracted" in line and (line["reward"] is None or 0.0 <= line["reward"] <= 1.0)
    recomputed = _recompute(lines)
    assert summary["by_problem_type"].keys() == recomputed.keys()
    for pt, stats in recomputed.items():
        assert summary["by_problem_type"][pt] == pytest.approx(stats)
    scored = [line["reward"] for line in lines if line["reward"] is not None]
    assert summary["n_none"] == 1000 - len(scored) == 125
    assert summary["mean_reward"] == pytest.approx(sum(scored) / len(scored))
    assert summary["by_problem_type"]["free_form"]["mean_reward"] == pytest.approx(
        sum(r["completion"] == "The cat." for r in rows if r["problem_type"] == "free_form") / 125
    )
    assert "all" in capsys.readouterr().out


def test_score_file_spot_values_and_several_rewards(tmp_path: Path) -> None:
    rows = [
        {
            "completion": "<think>a</think><answer>C</answer>",
            "answer": "C",
            "problem_type": "multiple_choice",
        },
        {
            "completion": "<answer>[0.1, 0.1, 0.5, 0.5]</answer>",
            "answer": "[100, 50, 500, 250]",
            "problem_type": "grounding",
            "metadata": {"coord_space": "norm1", "image_size": [1000, 500]},
        },  # fmt: skip
        {"completion": "<answer>x</answer>", "answer": "q", "problem_type": "yes_no"},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    summary = score_file(src, dst, rewards=("accuracy", RewardSpec("format", 0.5)), print_summary=False)
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [line["reward"] for line in lines] == [1.5, 1.0, None]
    assert lines[0]["rewards"] == {"accuracy": 1.0, "format": 1.0} and lines[0]["extracted"] == "C"
    assert lines[2]["rewards"] == {"accuracy": None, "format": 0.0}
    assert summary["n_none"] == 1 and summary["mean_reward"] == pytest.approx(1.25)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", ":2: invalid JSON"),
        ('["a"]', ":2: expected a JSON object"),
        ('{"answer": "1", "problem_type": "numerical"}', ":2: missing field 'completion'"),
        ('{"completion": 3, "answer": "1", "problem_type": "numerical"}', ":2: field 'completion'"),
        ('{"completion": "1", "answer": null, "problem_type": "numerical"}', ":2: field 'answer'"),
        ('{"completion": "1", "answer": "1", "problem_type": "essay"}', ":2: field 'problem_type'"),
        (
            '{"completion": "1", "answer": "[1,2,3,4]", "problem_type": "grounding", "coord_space": "norm1000"}',
            ":2: field 'image_size'",
        ),  # fmt: skip
        (
            '{"completion": "1", "answer": "[1,2,3,4]", "problem_type": "grounding", "coord_space": "polar"}',
            ":2: field 'coord_space'",
        ),  # fmt: skip
        (
            '{"completion": "1", "answer": "A", "problem_type": "multiple_choice", "options": "ABCD"}',
            ":2: field 'options'",
        ),  # fmt: skip
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    src = tmp_path / "bad.jsonl"
    _write(src, ['{"completion": "1", "answer": "1", "problem_type": "numerical"}', line])
    with pytest.raises(ScoreInputError, match=message) as info:
        score_file(src, tmp_path / "out.jsonl", print_summary=False)
    assert str(src) in str(info.value)


@pytest.mark.slow
def test_score_file_with_worker_pool(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [_row(i, rng) for i in range(200)]
    src = tmp_path / "in.jsonl"
    _write(src, rows)
    a = score_file(src, tmp_path / "a.jsonl", print_summary=False)
    b = score_file(src, tmp_path / "b.jsonl", workers=2, print_summary=False)
    assert a["by_problem_type"] == b["by_problem_type"]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_report_counts_disagreements_per_problem_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"completion": "<answer>130</answer>", "answer": "130°", "problem_type": "math", "expected": 1},  # agree
        {"completion": "<answer>131</answer>", "answer": "130°", "problem_type": "math", "expected": True},  # false-
        {"completion": "<answer>7</answer>", "answer": "7", "problem_type": "math", "expected": 0},  # false+
        {"completion": "C (145°)", "answer": "145°", "problem_type": "multiple_choice",
         "options": ["125°", "135°", "145°"], "expected": 1},  # agree
        {"completion": "<answer>7</answer>", "answer": "seven", "problem_type": "numerical", "expected": 0.0},  # None
        {"completion": "<answer>yes</answer>", "answer": "yes", "problem_type": "yes_no"},  # unlabelled: not counted
    ]  # fmt: skip
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    summary = score_file(src, dst, report=True)
    report = summary["agreement"]
    assert report["all"] == {"n": 5, "agree": 2, "false_positive": 1, "false_negative": 1, "unscored": 1,
                             "lines": [2, 3, 5], "agreement": 0.4}  # fmt: skip
    assert report["by_problem_type"]["math"]["agreement"] == pytest.approx(1 / 3)
    assert report["by_problem_type"]["multiple_choice"] == {"n": 1, "agree": 1, "false_positive": 0,
        "false_negative": 0, "unscored": 0, "lines": [], "agreement": 1.0}  # fmt: skip
    assert "yes_no" not in report["by_problem_type"]
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [line.get("agrees") for line in lines] == [True, False, False, True, False, None]
    out = capsys.readouterr().out
    assert "disagreeing lines (first 20): 2, 3, 5" in out and "0.4000" in out


def test_report_refuses_a_bad_expected_value(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write(src, [{"completion": "1", "answer": "1", "problem_type": "numerical", "expected": "yes"}])
    with pytest.raises(ScoreInputError, match=r":1: field 'expected'"):
        score_file(src, tmp_path / "out.jsonl", report=True, print_summary=False)
