"""Datasets shaped as SophiaVL-R1, EasyR1 / Hugging Face and verl publish them, through the whole `vlrl` command
line as a user runs it: `data stats`, `data validate`, 2 SFT steps, 2 GRPO steps and `eval`, each checked against
the rows the test wrote."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from framework_shapes import Expected, write_easyr1, write_sophiavl, write_verl
from test_data_frameworks import check_against

from vlrl.cli import main
from vlrl.data import load_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def build(shape: str, root: Path) -> tuple[list[str], list[str], list[str], dict[str, list[Expected]]]:
    """(CLI words that name the train data, the same for the test data, extra `key=value` overrides for the
    config commands, the rows written per split)."""
    if shape == "sophiavl":
        expected = write_sophiavl(root)
        registry = str(root / "dataset_info.json")
        return (["demo", "--registry", registry], ["demo_test", "--registry", registry], [f"registry={registry}"],
                expected)
    if shape == "easyr1":
        expected = write_easyr1(root / "geo3k")
        return [str(root / "geo3k")], [f"{root / 'geo3k'}@test"], [], expected
    expected = {"train": write_verl(root / "verl" / "train.parquet", 0, 6),
                "test": write_verl(root / "verl" / "test.parquet", 6, 3)}
    return [str(root / "verl" / "train.parquet")], [str(root / "verl" / "test.parquet")], [], expected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def last_json(text: str) -> dict:
    return json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)


@pytest.mark.parametrize("shape", ["sophiavl", "easyr1", "verl"])
def test_stats_validate_sft_grpo_eval(shape: str, tiny_model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    train, test, overrides, expected = build(shape, tmp_path / "data")
    rows = expected["train"]
    # what the readers give back is what was written
    registry = train[2] if len(train) > 1 else None
    check_against(load_dataset(train[0], registry=registry).samples, rows)

    stats = json.loads(run(capsys, "data", "stats", *train))
    assert stats["n"] == len(rows)
    assert stats["by_problem_type"] == dict(Counter(e.problem_type for e in rows))
    assert stats["images_per_sample"] == {str(k): v for k, v in sorted(Counter(len(e.colours) for e in rows).items())}

    report = tmp_path / "validate.jsonl"
    summary = last_json(run(capsys, "data", "validate", *train, "--model", str(tiny_model_dir),
                            "--report", str(report)))
    assert summary["n"] == len(rows) and summary["token_mismatch"] == 0 and summary["n_skipped"] == 0
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["id"] for r in records] == [e.id for e in rows]
    assert [r["image_sizes"] for r in records] == [[[56, 56]] * len(e.colours) for e in rows]

    sft_out = tmp_path / "sft"
    run(capsys, "sft", "--model", str(tiny_model_dir), "--data", train[0], "--out", str(sft_out), *overrides,
        "max_steps=2", "batch_size=4", "micro_batch_size=2", "save_every=2", "log_every=1", "warmup_steps=1")
    sft_metrics = [json.loads(line) for line in (sft_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft_metrics] == [1, 2] and all(m["loss"] > 0 for m in sft_metrics)
    sft_ckpt = sft_out / "checkpoints" / "step-2"
    assert (sft_ckpt / "model.safetensors").is_file()

    rl_out = tmp_path / "rl"
    run(capsys, "rl", "--model", str(sft_ckpt), "--data", train[0], "--out", str(rl_out), *overrides,
        "max_steps=2", "micro_batch_size=4", "rollout.batch_size=2", "rollout.group_size=2",
        "rollout.max_new_tokens=4", "optim.lr=1e-4", "logging.save_every=2", "logging.log_every=1")
    rl_metrics = [json.loads(line) for line in (rl_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl_metrics] == [1, 2]
    assert all(0.0 <= m["reward/accuracy"] <= 1.0 for m in rl_metrics)
    rolled = [json.loads(line) for line in (rl_out / "samples.jsonl").read_text().splitlines()]
    answers = {e.id: e.answer for e in rows}
    assert rolled and all(r["answer"] == answers[r["id"]] for r in rolled)
    rl_ckpt = rl_out / "checkpoints" / "step-2"
    assert (rl_ckpt / "model.safetensors").is_file()

    results = tmp_path / "eval" / "results.json"
    run(capsys, "eval", "--model", str(rl_ckpt), "--data", test[0], "--out", str(results), *overrides,
        "max_new_tokens=4")
    summary = json.loads(results.read_text())
    assert summary["n"] == len(expected["test"])
    predictions = [json.loads(line) for line in Path(summary["predictions"]).read_text().splitlines()]
    assert [(p["id"], p["answer"], p["problem_type"]) for p in predictions] == \
        [(e.id, e.answer, e.problem_type) for e in expected["test"]]
