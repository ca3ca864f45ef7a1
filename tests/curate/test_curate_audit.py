"""`vlrl data validate | stats | convert`. The token budget comes from the model family's adapter without
processing pixels (Qwen-VL: the min/max-pixel resize; InternVL: tiles x tokens per tile); the tests hold it to
what each family's processor really produces, on Qwen2-VL and InternVL."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlrl.curate.audit import PARQUET_COLUMNS, RecordReport, convert, dataset_stats, validate_samples
from vlrl.data.formats import read_file
from vlrl.data.registry import load_dataset
from vlrl.data.sample import Sample
from vlrl.models.build import init_model
from vlrl.models.inputs import encode_prompt, sample_images
from vlrl.models.processor import image_token_id, load_processor

TILE = 112  # the tiny InternVL's tile side: 16 image tokens per tile
# (w, h) of the test images: square, wide, tall, very wide, large, tiny: different tile grids and resizes
SIZES = [(112, 112), (224, 112), (112, 300), (500, 90), (300, 300), (40, 30)]


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("internvl", "tiny", tmp_path_factory.mktemp("models") / "tiny-internvl", seed=0)


@pytest.fixture(scope="module")
def internvl_tiled_dir(internvl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny InternVL's processor as InternVL3's checkpoints save it: up to several tiles per image (6 here, 12
    there); `data validate` loads only the processor, so the weights are not copied."""
    folder = tmp_path_factory.mktemp("models") / "tiny-internvl-tiled"
    shutil.copytree(internvl_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["max_patches"] = 6
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


@pytest.fixture(scope="module")
def varied_jsonl(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic records (112 x 112 images) and copies of them whose images are resized to each of SIZES, plus
    one record with two images, as VLM-R1 jsonl."""
    out = tmp_path_factory.mktemp("varied")
    base = load_dataset(str(synth_dir / "counting" / "train.jsonl")).samples[:len(SIZES)]
    samples = list(base[:2])
    for k, (s, size) in enumerate(zip(base, SIZES)):
        path = out / f"image-{k}.png"
        Image.open(s.images[0]).convert("RGB").resize(size).save(path)
        samples.append(dataclasses.replace(s, id=f"{s.id}-{size[0]}x{size[1]}", images=[str(path)]))
    two = [str(out / "image-1.png"), str(out / "image-2.png")]
    samples.append(Sample(id="two-images", images=two, answer="A", problem_type="multiple_choice",
                          messages=[{"role": "user", "content": "Which has more shapes, <image> or <image>?"}]))
    return convert(samples, out / "varied.jsonl")


def _assert_counts_are_the_processors(samples: list[Sample], reports: list[RecordReport], proc) -> list[int]:
    """Each report's vision tokens are the processor's image tokens in the encoded prompt, its total the prompt's
    length; returns the per-record vision tokens."""
    counts = []
    for s, r in zip(samples, reports, strict=True):
        enc = encode_prompt(proc, s.messages, sample_images(s))
        assert int((enc.input_ids == image_token_id(proc)).sum()) == r.vision_tokens, s.id
        assert len(enc.input_ids) == r.total_tokens == r.vision_tokens + r.text_tokens, s.id
        counts.append(r.vision_tokens)
    return counts


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


@pytest.mark.parametrize("max_pixels", [None, 6 * TILE * TILE])
@pytest.mark.parametrize("arch", ["qwen2-vl", "internvl"])
def test_validate_counts_are_the_processors(arch, max_pixels, tiny_model_dir, internvl_dir, varied_jsonl):
    folder = internvl_dir if arch == "internvl" else tiny_model_dir
    proc = load_processor(folder, max_pixels=max_pixels)
    samples = load_dataset(str(varied_jsonl)).samples
    reports, summary = validate_samples(samples, proc, budget=60)
    counts = _assert_counts_are_the_processors(samples, reports, proc)
    assert summary["token_mismatch"] == 0 and summary["vision_tokens"] == sum(counts)
    assert summary["over_budget"] == sum(r.total_tokens > 60 for r in reports)
    wide = next(r for r in reports if r.id.endswith("-224x112"))
    assert wide.image_sizes == [(224, 112)]
    if arch == "internvl" and max_pixels is None:  # one tile per image, whatever its size
        assert set(counts[:-1]) == {16} and counts[-1] == 32
        assert {size for r in reports for size in r.resized_sizes} == {(TILE, TILE)}
    elif arch == "internvl":  # 2 x 1 tiles + a thumbnail; the canvas the image is resized to before cropping
        assert (wide.resized_sizes, wide.vision_tokens) == ([(2 * TILE, TILE)], 3 * 16)
        assert len(set(counts)) >= 5
    else:  # Qwen2-VL: multiples of 28 within min/max pixels, one token per 28 x 28
        w, h = wide.resized_sizes[0]
        assert w % 28 == 0 and h % 28 == 0 and wide.vision_tokens == (w // 28) * (h // 28)
        assert len(set(counts)) >= 5


def test_cli_validate_internvl_counts_the_processors_image_tokens(internvl_tiled_dir, varied_jsonl, tmp_path):
    report = tmp_path / "report.jsonl"
    out = subprocess.run([sys.executable, "-m", "vlrl.cli", "data", "validate", str(varied_jsonl),
                          "--model", str(internvl_tiled_dir), "--prompt-budget", "100", "--report", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    samples = load_dataset(str(varied_jsonl)).samples
    proc = load_processor(internvl_tiled_dir)
    assert proc.image_processor.max_patches == 6
    counts = _assert_counts_are_the_processors(samples, [RecordReport(**r) for r in reports], proc)
    tiles = [int(encode_prompt(proc, s.messages, sample_images(s)).pixel_values.shape[0]) for s in samples]
    assert counts == [16 * t for t in tiles] and len(set(counts)) >= 5
    assert summary["n"] == len(samples) and summary["token_mismatch"] == 0
    assert summary["vision_tokens"] == sum(counts)
    flagged = [ln for ln in out.stdout.splitlines() if ": over budget: " in ln]
    assert len(flagged) == summary["over_budget"] == sum(r["total_tokens"] > 100 for r in reports) > 0


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
