"""Every malformed input names the file, the line and the field; skip_invalid drops and counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlrl.data import ColumnMap, DataError, read_file


def png(path: Path) -> Path:
    Image.new("RGB", (16, 16), (0, 128, 0)).save(path)
    return path


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def good(i: int) -> dict[str, Any]:
    return {
        "id": f"g{i}",
        "image": "ok.png",
        "conversations": [
            {"from": "human", "value": "<image>Q?"},
            {"from": "gpt", "value": "<answer>1</answer>"},
        ],
    }


def expect(path: Path, line: int | None, field: str | None, match: str, **kwargs: Any) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        read_file(path, **kwargs)
    err, text = info.value, str(info.value)
    assert path.name in text and err.path == str(path)
    assert err.line == line and err.field == field
    if line is not None:
        assert f"{path.name}:{line}:" in text
    if field is not None:
        assert f"field '{field}'" in text
    return err


@pytest.fixture
def root(tmp_path: Path) -> Path:
    png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage garbage garbage")
    return tmp_path


def test_missing_data_file(tmp_path: Path) -> None:
    expect(tmp_path / "absent.jsonl", None, None, "data file not found")


def test_invalid_json_line(root: Path) -> None:
    path = jsonl(root / "d.jsonl", [good(1), '{"id": "x", "image": ', good(3)])
    expect(path, 2, None, "invalid JSON")


def test_record_not_an_object(root: Path) -> None:
    expect(jsonl(root / "d.jsonl", [good(1), "[1, 2]"]), 2, None, "must be a JSON object")


def test_missing_required_field(root: Path) -> None:
    bad = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Q?"}]}  # no gpt, no answer
    expect(jsonl(root / "d.jsonl", [good(1), good(2), bad]), 3, "answer", "missing required field")


def test_missing_required_field_mathv(root: Path) -> None:
    rec = {"id": "1", "question": "<image1> x?", "options": [], "subject": "s", "level": 1, "image": "ok.png"}
    expect(jsonl(root / "m.jsonl", [rec]), 1, "answer", "missing required field")


def test_bad_turn_speaker(root: Path) -> None:
    bad = good(2)
    bad["conversations"][0]["from"] = "robot"
    expect(jsonl(root / "d.jsonl", [good(1), bad]), 2, "conversations[0].from", "unknown speaker 'robot'")


def test_image_file_missing(root: Path) -> None:
    bad = good(2) | {"image": ["ok.png", "gone.png"]}
    bad["conversations"][0]["value"] = "<image><image>Q?"
    err = expect(jsonl(root / "d.jsonl", [good(1), bad]), 2, "image[1]", "image file not found")
    assert "gone.png" in str(err)


def test_image_missing_even_without_image_check(root: Path) -> None:
    bad = good(1) | {"image": "gone.png"}
    expect(jsonl(root / "d.jsonl", [bad]), 1, "image", "image file not found", check_images=False)


def test_image_unreadable(root: Path) -> None:
    bad = good(2) | {"image": "bad.png"}
    err = expect(jsonl(root / "d.jsonl", [good(1), bad]), 2, "image", "unreadable image")
    assert "bad.png" in str(err)


def test_unreadable_image_passes_when_check_disabled(root: Path) -> None:
    ds = read_file(jsonl(root / "d.jsonl", [good(1) | {"image": "bad.png"}]), check_images=False)
    assert len(ds) == 1


def test_image_bomb_in_record(root: Path) -> None:
    png(root / "big.png")
    bad = good(1) | {"image": "big.png"}
    expect(jsonl(root / "d.jsonl", [bad]), 1, "image", "decompression bomb", max_image_pixels=100)


def test_placeholder_count_mismatch(root: Path) -> None:
    bad = good(3)
    bad["conversations"][0]["value"] = "<image> and <image>: same?"
    path = jsonl(root / "d.jsonl", [good(1), good(2), bad])
    expect(path, 3, "conversations[0].value", "2 <image> placeholder")


def test_placeholder_without_image(root: Path) -> None:
    bad = good(1)
    del bad["image"]
    expect(jsonl(root / "d.jsonl", [bad]), 1, "conversations[0].value", "1 <image> placeholder.* but 0 image")


def test_unknown_problem_type(root: Path) -> None:
    bad = good(2) | {"problem_type": "regression"}
    expect(jsonl(root / "d.jsonl", [good(1), bad]), 2, "problem_type", "unknown problem_type 'regression'")


def test_missing_column_jsonl(root: Path) -> None:
    rows = [{"q": "a", "ans": "1"}, {"q": "b"}]
    cols = ColumnMap(question="q", answer="ans", image=None)
    err = expect(jsonl(root / "c.jsonl", rows), 2, "ans", "missing column", columns=cols)
    assert "present: q" in str(err)


def test_missing_image_column_jsonl(root: Path) -> None:
    cols = ColumnMap(question="q", answer="a", image="picture")
    expect(jsonl(root / "c.jsonl", [{"q": "x", "a": "1"}]), 1, "picture", "missing column", columns=cols)


def test_missing_column_parquet(root: Path) -> None:
    path = root / "t.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", "2"]}), path)
    expect(path, 1, "img", "missing column", columns=ColumnMap(image="img"))


def test_undecodable_image_bytes_column(root: Path) -> None:
    path = root / "b.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["1"], "image": [b"\x89PNG..."]}), path)
    expect(path, 1, "image", "unreadable image: not in any image format PIL reads")


def test_unknown_column_map_key(root: Path) -> None:
    path = jsonl(root / "c.jsonl", [{"q": "a"}])
    with pytest.raises(DataError, match="unknown key.*picture.*valid: question") as info:
        read_file(path, columns={"picture": "img"})
    assert info.value.field == "columns"


def test_duplicate_id(root: Path) -> None:
    expect(jsonl(root / "d.jsonl", [good(1), good(1)]), 2, "id", "duplicate id 'g1'")


def test_llava_bad_entry_index(root: Path) -> None:
    path = root / "l.json"
    path.write_text(json.dumps([good(1), good(2) | {"conversations": []}]))
    expect(path, 2, "conversations", "non-empty list")


def test_llava_invalid_json_reports_file_line(root: Path) -> None:
    path = root / "l.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]\n')
    expect(path, 3, None, "invalid JSON")


def test_undetectable_format_is_fatal_even_when_skipping(root: Path) -> None:
    path = jsonl(root / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot tell the format"):
        read_file(path, skip_invalid=True)


def test_skip_invalid_counts_and_keeps_going(root: Path) -> None:
    no_answer = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Q?"}]}
    mismatch = good(5)
    mismatch["conversations"][0]["value"] = "<image><image>"
    records: list[Any] = [
        "not json",  # line 1: the first record is invalid; the format comes from the next
        good(2),
        no_answer,
        good(4) | {"image": "gone.png"},
        mismatch,
        good(6) | {"image": "bad.png"},
        good(7) | {"problem_type": "nope"},
        good(2),  # duplicate id
        good(9),
    ]
    ds = read_file(jsonl(root / "d.jsonl", records), skip_invalid=True)
    assert [s.id for s in ds] == ["g2", "g9"]
    assert ds.n_skipped == 7 and len(ds.errors) == 7
    lines = [int(e.split("d.jsonl:", 1)[1].split(":", 1)[0]) for e in ds.errors]
    assert lines == [1, 3, 4, 5, 6, 7, 8]
    assert "field 'answer'" in ds.errors[1] and "field 'image'" in ds.errors[2]
