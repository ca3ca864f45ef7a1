"""Readers on small fixtures: VLM-R1 jsonl, LLaVA json, column-mapped jsonl / parquet, detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlrl.data import ColumnMap, Dataset, read_file
from vlrl.data.formats import detect_format


def png(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def conv(human: str, gpt: str | None = None) -> list[dict[str, str]]:
    turns = [{"from": "human", "value": human}]
    return turns + ([{"from": "gpt", "value": gpt}] if gpt is not None else [])


def test_vlmr1_single_image(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    record = {
        "id": "r1",
        "image": "img/a.png",
        "conversations": conv("<image>What colour?", "<think>hm</think><answer> red </answer>"),
        "problem_type": "free-form",
        "task": "colour",
        "image_size": [32, 32],
        "coord_space": "pixel",
    }
    ds = read_file(jsonl(tmp_path / "train.jsonl", [record]))
    assert isinstance(ds, Dataset) and len(ds) == 1 and ds.n_skipped == 0
    s = ds[0]
    assert s.id == "r1"
    assert s.images == [str((tmp_path / "img" / "a.png").resolve())]
    assert s.messages == [{"role": "user", "content": "<image>What colour?"}]
    assert s.response == "<think>hm</think><answer> red </answer>"
    assert s.answer == "red"  # the last <answer> content, stripped
    assert s.problem_type == "free_form"
    assert s.task == "colour"
    assert s.metadata["image_size"] == [32, 32] and s.metadata["coord_space"] == "pixel"
    assert s.metadata["source"] == f"{tmp_path / 'train.jsonl'}:1"


def test_vlmr1_image_list_keeps_placeholders_in_place(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", (0, 0, 255))
    text = "Left: <image> right: <image>. Which is blue?"
    record = {"image": ["a.png", "b.png"], "conversations": conv(text, "<answer>right</answer>")}
    s = read_file(jsonl(tmp_path / "d.jsonl", [record]))[0]
    assert s.messages[0]["content"] == text
    assert [Path(p).name for p in s.images] == ["a.png", "b.png"]
    assert s.id == "d-1"  # no id: file stem and line


def test_vlmr1_missing_placeholders_are_prepended(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    records = [
        {"image": "a.png", "conversations": conv("Describe.", "A square.")},
        {"image": ["a.png", "b.png"], "conversations": conv("Compare them.", "Same.")},
    ]
    ds = read_file(jsonl(tmp_path / "d.jsonl", records))
    assert ds[0].messages[0]["content"] == "<image>Describe."
    assert ds[1].messages[0]["content"] == "<image><image>Compare them."
    assert ds[0].answer == "A square."  # no answer field, no tags: the gpt text stripped


def test_vlmr1_text_only_roles_and_answer_field(tmp_path: Path) -> None:
    record = {
        "id": 5,
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "times 3?"},
            {"from": "gpt", "value": "<answer>12</answer>"},
        ],
        "answer": 12,
    }
    s = read_file(jsonl(tmp_path / "t.jsonl", [record]))[0]
    assert s.id == "5" and s.images == []
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user"]
    assert s.response == "<answer>12</answer>"
    assert s.answer == "12" and s.problem_type == "numerical"  # inferred from the answer


def test_vlmr1_prompt_only_record(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": conv("<image>Box the cat."), "answer": [1, 2, 30, 40]}
    s = read_file(jsonl(tmp_path / "p.jsonl", [record]))[0]
    assert s.response is None and s.answer == "[1, 2, 30, 40]" and s.problem_type == "grounding"


def test_problem_type_default_and_inference(tmp_path: Path) -> None:
    records = [
        {"conversations": conv("Is it?", "<answer>Yes</answer>")},
        {"conversations": conv("Pick", "B"), "options": ["x", "y"]},
        {"conversations": conv("Say", "hello world")},
    ]
    path = jsonl(tmp_path / "p.jsonl", records)
    assert [s.problem_type for s in read_file(path)] == ["yes_no", "multiple_choice", "free_form"]
    assert {s.problem_type for s in read_file(path, problem_type="OCR")} == {"ocr"}


def test_llava_json_list(tmp_path: Path) -> None:
    png(tmp_path / "images" / "x.png")
    data = [
        {"id": "a", "image": "x.png", "conversations": conv("<image>\nWhat is it?", "A red square.")},
        {"id": "b", "image": "x.png", "conversations": conv("Colour?", "Red")},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(data, indent=2))
    ds = read_file(path, image_root=tmp_path / "images")
    assert [s.id for s in ds] == ["a", "b"]
    assert ds[0].messages[0]["content"] == "<image>\nWhat is it?"
    assert ds[1].messages[0]["content"] == "<image>Colour?"
    assert ds[1].metadata["source"].endswith("llava.json:2")  # "line" = 1-based index in the list
    assert detect_format(data[0], "json") == "llava"
    assert detect_format(data[0], "jsonl") == "vlmr1"


def test_column_map_jsonl(tmp_path: Path) -> None:
    png(tmp_path / "q1.png")
    rows = [
        {"qid": "x1", "q": "How many?", "a": 3, "img": "q1.png", "opts": None, "diff": "easy"},
        {"qid": "x2", "q": "Which? <image>", "a": "B", "img": ["q1.png"], "opts": ["cat", "dog"]},
    ]
    cols = ColumnMap(id="qid", question="q", answer="a", image="img", options="opts")
    ds = read_file(jsonl(tmp_path / "t.jsonl", rows), columns=cols)
    assert [s.id for s in ds] == ["x1", "x2"]
    assert ds[0].messages[0]["content"] == "<image>How many?" and ds[0].answer == "3"
    assert ds[0].problem_type == "numerical" and ds[0].metadata["diff"] == "easy"
    assert ds[1].messages[0]["content"] == "Which? <image>\nA. cat\nB. dog"
    assert ds[1].problem_type == "multiple_choice" and ds[1].metadata["options"] == ["cat", "dog"]


def test_column_map_from_dict_and_fixed_problem_type(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "t.jsonl", [{"prompt": "Spell cat", "gt": "c-a-t", "demo": "<answer>c-a-t</answer>"}]
    )
    cols = {"question": "prompt", "answer": "gt", "image": None, "response": "demo"}
    ds = read_file(path, columns=cols, problem_type="ocr")
    assert ds[0].problem_type == "ocr" and ds[0].response == "<answer>c-a-t</answer>" and ds[0].images == []


def test_column_map_parquet(tmp_path: Path) -> None:
    png(tmp_path / "pics" / "p0.png")
    png(tmp_path / "pics" / "p1.png")
    table = pa.table(
        {
            "question": ["Count the dots.", "Is it red?"],
            "answer": ["4", "yes"],
            "image": ["pics/p0.png", "pics/p1.png"],
            "kind": ["numerical", "yes_no"],
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    ds = read_file(path, columns=ColumnMap(problem_type="kind"))
    assert len(ds) == 2 and [s.problem_type for s in ds] == ["numerical", "yes_no"]
    assert ds[1].images == [str((tmp_path / "pics" / "p1.png").resolve())]
    assert ds[1].id == "t-2" and ds[1].metadata["source"].endswith("t.parquet:2")
    # default column names (question / answer / image) are detected without a map
    assert [s.answer for s in read_file(path)] == ["4", "yes"]


def test_format_override_and_limit(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": str(i), "image": None} for i in range(5)]
    path = jsonl(tmp_path / "t.jsonl", rows)
    ds = read_file(path, format="columns", limit=2)
    assert [s.answer for s in ds] == ["0", "1"]
    assert detect_format({"sentence": "s", "label": "true"}, "jsonl") == "nlvr"
    assert detect_format({"question": "q", "subject": "x", "level": 1, "options": []}, "jsonl") == "mathv"
    assert detect_format({"foo": 1}, "jsonl") is None


def test_skip_blank_lines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    first, second = (json.dumps({"question": q, "answer": a}).encode() for q, a in (("a", "1"), ("b", "2")))
    path.write_bytes(b"\xef\xbb\xbf" + first + b"\n\n  \n" + second + b"\n")
    ds = read_file(path)
    assert [s.metadata["source"].rsplit(":", 1)[1] for s in ds] == ["1", "4"]


def test_unknown_format_lists_valid(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", [{"question": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="valid: vlmr1, llava, mathv, nlvr, columns"):
        read_file(path, format="sharegpt")
