"""`vlrl data convert`: VLM-R1 jsonl <-> verl parquet <-> EasyR1 parquet, images embedded or as files, and back
to the same Samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlrl.cli import main
from vlrl.data import DataError, Sample, load_dataset
from vlrl.data.embedded import parse_ref, read_ref
from vlrl.data.writers import write_dataset

RECORDS: list[dict[str, Any]] = [
    {"id": "one", "image": "img/a.png", "problem_type": "numerical", "task": "counting", "image_size": [32, 24],
     "conversations": [{"from": "human", "value": "<image>How many?"},
                       {"from": "gpt", "value": "<think>count</think><answer>3</answer>"}]},
    {"id": "two", "image": ["img/a.png", "img/b.png"], "answer": "B", "problem_type": "multiple_choice",
     "options": ["left", "right"],
     "conversations": [{"from": "human", "value": "Compare <image> with <image>.\nA. left\nB. right"}]},
    {"id": "text", "answer": "yes", "conversations": [{"from": "system", "value": "Be brief."},
                                                      {"from": "human", "value": "Is 2 even?"}]},
    {"id": "multi", "image": "img/c.png", "problem_type": "free_form",
     "conversations": [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A square."},
                       {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "<answer>red</answer>"}]},
    {"id": "box", "image": "img/b.png", "answer": [1, 2, 30, 20], "coord_space": "pixel",
     "conversations": [{"from": "human", "value": "<image>Find the square."}]},
]


@pytest.fixture
def vlmr1(tmp_path: Path) -> Path:
    for name, colour, size in (("a", (255, 0, 0), (32, 24)), ("b", (0, 200, 0), (40, 40)), ("c", (9, 9, 250), (28, 56))):
        (tmp_path / "src" / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(tmp_path / "src" / "img" / f"{name}.png")
    path = tmp_path / "src" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def image_bytes(image: str) -> bytes:
    ref = parse_ref(image)
    return read_ref(ref)[0] if ref is not None else Path(image).read_bytes()


def same_samples(a: list[Sample], b: list[Sample]) -> None:
    """Equal Samples: every field, metadata but its `source` (file:line of the file read), images by their bytes."""
    def key(s: Sample) -> tuple[Any, ...]:
        meta = {k: v for k, v in s.metadata.items() if k != "source"}
        return (s.id, s.messages, s.answer, s.problem_type, s.response, meta, [image_bytes(i) for i in s.images])

    assert [key(s) for s in b] == [key(s) for s in a]


def test_the_original_reads_as_written(vlmr1: Path) -> None:
    src = load_dataset(str(vlmr1)).samples
    assert [s.answer for s in src] == ["3", "B", "yes", "red", "[1, 2, 30, 20]"]
    assert [len(s.images) for s in src] == [1, 2, 0, 1, 1]
    assert [s.response is None for s in src] == [False, True, True, False, True]
    assert src[3].messages[1] == {"role": "assistant", "content": "A square."}


@pytest.mark.parametrize("fmt", ["verl", "easyr1"])
def test_round_trip_through_parquet_with_embedded_images(vlmr1: Path, tmp_path: Path, fmt: str) -> None:
    src = load_dataset(str(vlmr1)).samples
    parquet = write_dataset(src, tmp_path / "out" / f"{fmt}.parquet", format=fmt)
    mid = load_dataset(str(parquet))
    same_samples(src, mid.samples)
    assert all(parse_ref(i) is not None for s in mid for i in s.images)  # embedded, read lazily
    back = write_dataset(mid.samples, tmp_path / "out" / f"{fmt}-back.jsonl")
    again = load_dataset(str(back)).samples
    same_samples(src, again)
    assert again[1].images[0].startswith(str(tmp_path / "out" / f"{fmt}-back-images"))  # extracted beside it
    assert len(list((tmp_path / "out" / f"{fmt}-back-images").iterdir())) == 5


def test_verl_and_easyr1_schemas_as_the_frameworks_read_them(vlmr1: Path, tmp_path: Path) -> None:
    src = load_dataset(str(vlmr1)).samples
    verl = pq.read_table(write_dataset(src, tmp_path / "v.parquet", format="verl")).to_pylist()
    assert verl[1]["prompt"] == [{"role": "user", "content": "Compare <image> with <image>.\nA. left\nB. right"}]
    assert verl[1]["reward_model"] == {"style": "rule", "ground_truth": "B"} and verl[1]["ability"] == "multiple_choice"
    assert verl[1]["images"][1] == {"bytes": (vlmr1.parent / "img" / "b.png").read_bytes(), "path": "b.png"}
    assert verl[0]["data_source"] == "counting" and verl[0]["extra_info"]["index"] == 0
    easy = pq.read_table(write_dataset(src, tmp_path / "e.parquet", format="easyr1")).to_pylist()
    assert easy[0]["problem"] == "<image>How many?" and easy[0]["answer"] == "3"
    assert easy[0]["images"] == [{"bytes": (vlmr1.parent / "img" / "a.png").read_bytes(), "path": "a.png"}]


@pytest.mark.parametrize("fmt", ["verl", "easyr1"])
def test_images_as_files(vlmr1: Path, tmp_path: Path, fmt: str) -> None:
    src = load_dataset(str(vlmr1)).samples
    out = write_dataset(src, tmp_path / "files" / "t.parquet", format=fmt, images="files")
    rows = pq.read_table(out).to_pylist()
    first = rows[0]["images"][0]
    assert first == ({"image": "t-images/000000-0.png"} if fmt == "verl" else "t-images/000000-0.png")
    back = load_dataset(str(out)).samples
    same_samples(src, back)
    assert back[0].images == [str(tmp_path / "files" / "t-images" / "000000-0.png")]


def test_cli_convert_both_ways(vlmr1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = load_dataset(str(vlmr1)).samples
    assert main(["data", "convert", str(vlmr1), "--out", str(tmp_path / "v.parquet"), "--format", "verl"]) == 0
    assert "5 records -> " in capsys.readouterr().out
    assert main(["data", "convert", str(tmp_path / "v.parquet"), "--out", str(tmp_path / "e.parquet")]) == 0
    assert main(["data", "convert", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "back.jsonl"),
                 "--images", "files"]) == 0
    same_samples(src, load_dataset(str(tmp_path / "e.parquet")).samples)
    same_samples(src, load_dataset(str(tmp_path / "back.jsonl")).samples)
    assert main(["data", "convert", str(vlmr1), "--out", str(tmp_path / "x.jsonl"), "--images", "embed"]) == 2
    assert "jsonl cannot hold image bytes" in capsys.readouterr().err


def test_output_format_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="write .jsonl or .parquet"):
        write_dataset([], tmp_path / "x.csv")
    with pytest.raises(DataError, match="unknown output format 'llava'"):
        write_dataset([], tmp_path / "x.parquet", format="llava")
