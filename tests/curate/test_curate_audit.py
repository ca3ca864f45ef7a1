"""`vlrl data validate | stats | convert`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlrl.curate.audit import PARQUET_COLUMNS, convert, dataset_stats, validate_samples
from vlrl.data.formats import read_file
from vlrl.data.registry import load_dataset
from vlrl.models.inputs import encode_prompt, sample_images
from vlrl.models.processor import image_token_id, load_processor


def test_validate_mathv_counts_all_304_and_flags_over_budget(tiny_model_dir, mathv_dir):
    samples = load_dataset(str(mathv_dir / "testmini.jsonl")).samples
    proc = load_processor(tiny_model_dir)
    reports, summary = validate_samples(samples, proc, budget=150)
    assert summary["n"] == len(reports) == 304
    assert all(r.vision_tokens > 0 and r.text_tokens > 0 for r in reports)
    assert summary["over_budget"] == sum(r.total_tokens > 150 for r in reports) > 0
    assert summary["token_mismatch"] == 0
    for s, r in list(zip(samples, reports))[:12]:  # the predicted counts are what the processor really makes
        enc = encode_prompt(proc, s.messages, sample_images(s))
        assert int((enc.input_ids == image_token_id(proc)).sum()) == r.vision_tokens
        assert len(enc.input_ids) == r.total_tokens


def test_cli_validate_flags_records_by_file_and_line(tiny_model_dir, mathv_dir):
    proc = subprocess.run([sys.executable, "-m", "vlrl.cli", "data", "validate", str(mathv_dir / "testmini.jsonl"),
                           "--model", str(tiny_model_dir), "--prompt-budget", "150"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    flagged = [ln for ln in proc.stdout.splitlines() if ": over budget: " in ln]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["n"] == 304 and len(flagged) == summary["over_budget"] > 0
    assert flagged[0].startswith(str(mathv_dir / "testmini.jsonl") + ":")


def test_stats_counts(synth_dir):
    samples = load_dataset(str(synth_dir / "chart" / "train.jsonl")).samples
    samples += load_dataset(str(synth_dir / "grounding" / "train.jsonl")).samples
    st = dataset_stats(samples)
    assert st["n"] == 96 and st["by_task"] == {"chart": 48, "grounding": 48}
    assert st["by_answer_type"] == {"letter": 48, "box": 48}
    assert st["by_problem_type"] == {"multiple_choice": 48, "grounding": 48}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_convert_round_trips(synth_dir, tmp_path, suffix):
    src = load_dataset(str(synth_dir / "counting" / "train.jsonl")).samples
    out = convert(src, tmp_path / f"out{suffix}")
    back = read_file(out, columns=PARQUET_COLUMNS if suffix == ".parquet" else None).samples
    assert [(s.id, s.answer, s.problem_type, s.images, s.response) for s in back] == \
        [(s.id, s.answer, s.problem_type, s.images, s.response) for s in src]
    assert [s.messages[-1]["content"] for s in back] == [s.messages[-1]["content"] for s in src]
