"""The `vlrl` command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def vlrl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return vlrl_all([*args], check=check)[0]


def vlrl_all(*commands: list[str], check: bool = True) -> list[subprocess.CompletedProcess]:
    """Run independent `vlrl` commands side by side (each one mostly pays its imports, on its own core)."""
    procs = [subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        if check:
            assert proc.returncode == 0, out + err
    return done


def test_init_model_synth_sft_eval_infer(tmp_path: Path):
    made, _, _ = vlrl_all(
        ["init-model", "--arch", "qwen2.5-vl", "--size", "tiny", "--out", str(tmp_path / "m")],
        ["data", "synth", "--task", "counting", "--n", "24", "--seed", "3", "--out", str(tmp_path / "d")],
        ["data", "synth", "--task", "counting", "--n", "8", "--seed", "3", "--split", "test",
         "--out", str(tmp_path / "d")])
    assert "qwen2.5-vl/tiny" in made.stdout and "M parameters" in made.stdout
    train = tmp_path / "d" / "counting" / "train.jsonl"
    assert len(train.read_text().splitlines()) == 24
    vlrl("sft", "--model", str(tmp_path / "m"), "--data", str(train), "--out", str(tmp_path / "run"),
         "max_steps=2", "batch_size=4", "micro_batch_size=2", "save_every=2")
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    assert (ckpt / "model.safetensors").exists()
    image = next((tmp_path / "d" / "counting" / "images").glob("train-*.png"))
    res, answer = vlrl_all(
        ["eval", "--model", str(ckpt), "--data", str(tmp_path / "d" / "counting" / "test.jsonl"),
         "--out", str(tmp_path / "results.json"), "max_new_tokens=4"],
        ["infer", "--model", str(ckpt), "--image", str(image), "--prompt", "How many shapes?", "--max-new-tokens", "4"])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["n"] == 8 and "counting" in summary["by_category"] and "accuracy" in res.stdout
    assert answer.stdout.endswith("\n") and len(answer.stdout.splitlines()) == 1  # one answer line


def test_unknown_config_key_is_rejected_with_valid_keys(tmp_path: Path):
    proc = vlrl("sft", "model=m", "data=[x]", f"out={tmp_path}", "learning_rate=1", check=False)
    assert proc.returncode == 2
    assert "unknown key(s) learning_rate" in proc.stderr and "lr" in proc.stderr


def test_unknown_command_lists_commands():
    proc = vlrl("bogus", check=False)
    assert proc.returncode == 2 and "sft" in proc.stderr and "eval" in proc.stderr and "unknown command" in proc.stderr


def test_bad_data_gives_file_line_field_and_no_traceback(tmp_path: Path):
    (tmp_path / "bad.jsonl").write_text(
        '{"id": "1", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>How many?"},'
        ' {"from": "gpt", "value": "3"}]}\n')
    proc = vlrl("eval", "--model", str(tmp_path / "nomodel"), "--data", str(tmp_path / "bad.jsonl"),
                "--out", str(tmp_path / "r.json"), check=False)
    assert proc.returncode == 2
    assert f"{tmp_path / 'bad.jsonl'}:1: field 'image': image file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flag_before_override_is_a_switch_not_its_value():
    from vlrl.cli import _flags_to_overrides

    out = _flags_to_overrides(["--skip-invalid", "limit=5", "--model", "runs/m=1", "--data", "a", "--data", "b"])
    assert out == ["skip_invalid=true", "model=runs/m=1", 'data=["a", "b"]', "limit=5"]


def test_score_report_on_the_regression_corpus(tmp_path: Path):
    corpus = Path(__file__).parent / "rewards" / "corpus" / "vlrl_cases.jsonl"
    out = vlrl("score", "--data", str(corpus), "--out", str(tmp_path / "scored.jsonl"), "--report").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["multiple_choice"][1:] == ["119", "119", "0", "0", "0", "1.0000"]  # n agree false+ false- none agreement
    assert rows["all"][-1] == "1.0000"
    assert all(json.loads(line)["agrees"] for line in (tmp_path / "scored.jsonl").read_text().splitlines())
