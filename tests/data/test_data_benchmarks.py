"""The two real benchmarks (MATH-V testmini, NLVR dev150) and the MATH-V / NLVR record rules."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlrl.data import load_dataset, read_file
from vlrl.data.benchmarks import NLVR_INSTRUCTION, mathv_question

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MATHV = SHARED / "mathv-testmini" / "testmini.jsonl"
NLVR = SHARED / "nlvr-dev150" / "dev150.jsonl"
needs_mathv = pytest.mark.skipif(not MATHV.is_file(), reason=f"MATH-V testmini not found at {MATHV}")
needs_nlvr = pytest.mark.skipif(not NLVR.is_file(), reason=f"NLVR dev150 not found at {NLVR}")


@needs_mathv
def test_mathv_testmini_reads_304() -> None:
    ds = load_dataset(str(MATHV))
    assert len(ds) == 304 and ds.n_skipped == 0
    for s in ds:
        assert len(s.images) == 1 and os.path.isfile(s.images[0])
        assert s.messages[0]["content"].count("<image>") == 1
        assert "<image1>" not in s.messages[0]["content"]
        assert s.metadata["task"] == "mathv" and s.metadata["subject"] and "level" in s.metadata
    types = Counter(s.problem_type for s in ds)
    assert types["multiple_choice"] == 190  # every item with options
    assert set(types) <= {"multiple_choice", "numerical", "math"}
    assert len({s.metadata["subject"] for s in ds}) > 5
    by_id = {s.id: s for s in ds}
    assert by_id["6"].messages[0]["content"].endswith("\nChoices: A, B, C, D, E") and by_id["6"].answer == "D"
    assert by_id["4"].problem_type == "numerical" and by_id["4"].answer == "6"


@needs_nlvr
def test_nlvr_dev150_reads_150() -> None:
    ds = read_file(NLVR)
    assert len(ds) == 150 and ds.n_skipped == 0
    assert all(os.path.isfile(s.images[0]) for s in ds)
    assert {s.answer for s in ds} == {"yes", "no"} and {s.problem_type for s in ds} == {"yes_no"}
    labels = Counter(json.loads(line)["label"] for line in NLVR.read_text().splitlines())
    assert Counter(s.answer for s in ds) == {"yes": labels["true"], "no": labels["false"]}
    s = ds[0]
    assert s.id == "1572-0" and s.task == "nlvr"
    assert s.messages[0]["content"].startswith("<image>Each grey box") and s.messages[0]["content"].endswith(
        NLVR_INSTRUCTION
    )


def test_mathv_question_tags() -> None:
    assert mathv_question("Which?\n<image1>", 1) == ("Which?\n<image>", [0])
    text, order = mathv_question("Ant <image1> at <image2>, again <image1>.", 1)
    assert text == "Ant <image> at [image2], again [image1]." and order == [0]
    text, order = mathv_question("<image2> then <image1>", 2)
    assert text == "<image> then <image>" and order == [1, 0]
    assert mathv_question("No tag.", 1) == ("No tag.", [])


def test_mathv_record_rules(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    base = {"solution": None, "level": 2, "subject": "arithmetic", "image": "a.jpg"}
    rows = [
        base | {"id": "1", "question": "Sum? <image1>", "options": [], "answer": "4.5"},
        base | {"id": "2", "question": "Shape?\n<image1>", "options": ["A", "B", "C"], "answer": "B"},
        base | {"id": "3", "question": "Time <image1>?", "options": ["2h", "3h <image2>"], "answer": "A"},
        base | {"id": "4", "question": "Ratio?", "options": [], "answer": "\\frac{1}{2}"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_file(path)
    assert [s.problem_type for s in ds] == ["numerical", "multiple_choice", "multiple_choice", "math"]
    assert ds[1].messages[0]["content"] == "Shape?\n<image>\nChoices: A, B, C"
    assert ds[2].messages[0]["content"] == "Time <image>?\nA. 2h\nB. 3h [image2]"
    assert ds[2].metadata["options"] == ["2h", "3h [image2]"]
    assert ds[3].messages[0]["content"] == "<image>Ratio?"  # no tag: the image goes first
    assert ds[0].metadata["subject"] == "arithmetic" and ds[0].metadata["level"] == 2


def test_nlvr_bad_label(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "n.png")
    path = tmp_path / "n.jsonl"
    path.write_text(
        json.dumps({"sentence": "s", "label": "maybe", "identifier": "1", "image": "n.png"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'label': must be 'true' or 'false'"):
        read_file(path)
