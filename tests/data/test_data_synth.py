"""Synthetic tasks: determinism, split disjointness, balance, chance, and answers checked on the pixels."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlrl.data import read_file
from vlrl.data.synth import SPLITS, TASKS, generate_item, scene_hash, split_of_hash, synth_main, write_split
from vlrl.data.synth.base import COLOURS
from vlrl.data.synth.chart import BAR, GREY, LABEL_ROW, TOP
from vlrl.data.synth.grounding import iou


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def components(image: Image.Image, colour: tuple[int, int, int] | None = None) -> int:
    """4-connected blobs of non-white pixels (of `colour` only, when given)."""
    w, h = image.size
    px = image.load()
    assert px is not None

    def on(x: int, y: int) -> bool:
        p = px[x, y]
        return p != (255, 255, 255) if colour is None else p == colour

    seen: set[tuple[int, int]] = set()
    count = 0
    for y0 in range(h):
        for x0 in range(w):
            if (x0, y0) in seen or not on(x0, y0):
                continue
            count += 1
            stack = [(x0, y0)]
            seen.add((x0, y0))
            while stack:
                x, y = stack.pop()
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and on(nx, ny):
                        seen.add((nx, ny))
                        stack.append((nx, ny))
    return count


def bar_heights(image: Image.Image, colour: tuple[int, int, int] = BAR) -> list[int]:
    """Heights (px) of the bars, left to right: runs of columns holding the bar colour."""
    w, h = image.size
    px = image.load()
    assert px is not None
    cols = [sum(px[x, y] == colour for y in range(h)) for x in range(w)]
    runs: list[list[int]] = []
    for x, c in enumerate(cols):
        if c and (not runs or cols[x - 1] == 0):
            runs.append([])
        if c:
            runs[-1].append(c)
    return [max(r) for r in runs]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_gives_identical_bytes(task: str, tmp_path: Path) -> None:
    a = write_split(task, 20, 7, tmp_path / "a")
    b = write_split(task, 20, 7, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for i in range(20):
        rel = f"{task}/images/train-{i}.png"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    c = write_split(task, 20, 8, tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_test_never_share_a_scene(task: str, tmp_path: Path) -> None:
    # same seed for both splits on purpose: disjointness must not depend on seeds differing
    train = write_split(task, 400, 0, tmp_path)
    test = write_split(task, 100, 0, tmp_path, split="test")
    hashes: dict[str, set[str]] = {}
    for split, path in (("train", train), ("test", test)):
        hashes[split] = set()
        for rec in records(path):
            digest = scene_hash(Image.open(path.parent / rec["image"]))  # from the pixels, not the record
            assert rec["scene_hash"] == digest[:16]
            assert split_of_hash(digest) == split
            hashes[split].add(digest)
    assert hashes["train"].isdisjoint(hashes["test"])
    assert len(hashes["test"]) > 50  # and the held-out split is not a handful of repeats


def test_split_residues_partition_the_hash_space() -> None:
    residues = [r for rs in SPLITS.values() for r in rs]
    assert sorted(residues) == list(range(10))
    with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, val, test"):
        generate_item("counting", 0, "dev", 0, 0)


def test_counting_balanced_and_correct(tmp_path: Path) -> None:
    path = write_split("counting", 120, 1, tmp_path)
    recs = records(path)
    assert Counter(r["answer"] for r in recs) == {str(k): 20 for k in range(1, 7)}
    assert [r["answer"] for r in recs[:12]] != [str(1 + i % 6) for i in range(12)]  # not a visible cycle
    for rec in recs[:36]:
        image = Image.open(path.parent / rec["image"]).convert("RGB")
        assert image.size == (112, 112)
        assert components(image) == int(rec["answer"])
        assert rec["conversations"][0]["value"] == "<image>How many shapes are in the image?"
        assert rec["conversations"][1]["value"] == f"<answer>{rec['answer']}</answer>"
        assert rec["problem_type"] == "numerical" and rec["task"] == "counting"


def test_counting_params_vary(tmp_path: Path) -> None:
    recs = records(write_split("counting", 30, 0, tmp_path, min_count=2, max_count=4, size=96))
    assert Counter(r["answer"] for r in recs) == {"2": 10, "3": 10, "4": 10}
    assert Image.open(tmp_path / "counting" / recs[0]["image"]).size == (96, 96)


def test_compare_balanced_never_tied_and_correct(tmp_path: Path) -> None:
    path = write_split("compare", 60, 2, tmp_path)
    recs = records(path)
    assert Counter(r["answer"] for r in recs) == {"yes": 30, "no": 30}
    for rec in recs:
        assert rec["n_red"] != rec["n_blue"]
        assert rec["answer"] == ("yes" if rec["n_red"] > rec["n_blue"] else "no")
    for rec in recs[:20]:
        image = Image.open(path.parent / rec["image"]).convert("RGB")
        assert components(image, COLOURS["red"]) == rec["n_red"]
        assert components(image, COLOURS["blue"]) == rec["n_blue"]


def test_chart_tallest_balanced_and_correct(tmp_path: Path) -> None:
    path = write_split("chart", 70, 3, tmp_path)
    recs = records(path)
    slots = Counter((len(r["options"]), r["answer"]) for r in recs)
    assert slots == {(k, "ABCD"[t]): 10 for k in (3, 4) for t in range(k)}
    for rec in recs[:30]:
        heights = bar_heights(Image.open(path.parent / rec["image"]).convert("RGB"))
        assert len(heights) == len(rec["options"])
        assert "ABCD"[heights.index(max(heights))] == rec["answer"]
        assert sorted(heights)[-1] - sorted(heights)[-2] >= 8  # clearly the tallest
        assert rec["conversations"][0]["value"].endswith("Choices: " + ", ".join(rec["options"]))
        assert rec["problem_type"] == "multiple_choice"


def test_chart_min_shortest_balanced_and_correct(tmp_path: Path) -> None:
    path = write_split("chart_min", 70, 3, tmp_path)
    recs = records(path)
    slots = Counter((len(r["options"]), r["answer"]) for r in recs)
    assert slots == {(k, "ABCD"[t]): 10 for k in (3, 4) for t in range(k)}
    for rec in recs[:30]:
        heights = bar_heights(Image.open(path.parent / rec["image"]).convert("RGB"))
        assert len(heights) == len(rec["options"])
        assert "ABCD"[heights.index(min(heights))] == rec["answer"]
        assert sorted(heights)[1] - sorted(heights)[0] >= 8  # clearly the shortest
        assert "Which bar is the shortest? Choices: " in rec["conversations"][0]["value"]
    assert TASKS["chart_min"].chance() == TASKS["chart"].chance()


def test_chart_grey_same_question_grey_bars(tmp_path: Path) -> None:
    path = write_split("chart_grey", 14, 3, tmp_path)
    for rec in records(path):
        image = Image.open(path.parent / rec["image"]).convert("RGB")
        assert bar_heights(image) == []  # no blue bar left
        heights = bar_heights(image, GREY)
        assert "ABCD"[heights.index(max(heights))] == rec["answer"]
        assert "Which bar is the tallest? Choices: " in rec["conversations"][0]["value"]


def test_chart_value_balanced_and_readable(tmp_path: Path) -> None:
    path = write_split("chart_value", 45, 4, tmp_path)
    recs = records(path)
    assert Counter(r["answer"] for r in recs) == {str(v): 5 for v in range(1, 10)}
    unit = (112 - LABEL_ROW - TOP) / 9
    for rec in recs:
        heights = bar_heights(Image.open(path.parent / rec["image"]).convert("RGB"))
        asked = "ABCD".index(rec["bar"])
        assert round(heights[asked] / unit) == int(rec["answer"])
        assert rec["conversations"][0]["value"] == f"<image>What is the value of bar {rec['bar']}?"


def test_grounding_box_is_tight_on_the_target(tmp_path: Path) -> None:
    path = write_split("grounding", 48, 5, tmp_path)
    recs = records(path)
    assert Counter(r["target"] for r in recs) == {t: 4 for t in Counter(r["target"] for r in recs)}
    assert len({r["target"] for r in recs}) == 12
    for rec in recs:
        assert rec["image_size"] == [112, 112] and rec["coord_space"] == "pixel"
        assert rec["problem_type"] == "grounding"
        x1, y1, x2, y2 = json.loads(rec["answer"])
        colour = COLOURS[rec["target"].split()[0]]
        image = Image.open(path.parent / rec["image"]).convert("RGB")
        crop = image.crop((x1, y1, x2, y2))
        assert crop.getbbox() is not None
        # every edge row / column of the box holds the target colour: the box is tight
        px = image.load()
        assert px is not None
        assert any(px[x, y1] == colour for x in range(x1, x2)) and any(
            px[x, y2 - 1] == colour for x in range(x1, x2)
        )
        assert any(px[x1, y] == colour for y in range(y1, y2)) and any(
            px[x2 - 1, y] == colour for y in range(y1, y2)
        )
        assert f"the {rec['target']} as [x1, y1, x2, y2]" in rec["conversations"][0]["value"]


def test_chance_values() -> None:
    assert TASKS["counting"].chance() == pytest.approx(1 / 6)
    assert TASKS["counting"].chance(min_count=1, max_count=4) == pytest.approx(1 / 4)
    assert TASKS["chart"].chance(min_bars=4, max_bars=4) == pytest.approx(1 / 4)
    assert TASKS["chart"].chance() == pytest.approx((3 * (1 / 3) + 4 * (1 / 4)) / 7)  # 7 equally likely slots
    assert TASKS["chart_value"].chance() == pytest.approx(1 / 9)
    assert TASKS["compare"].chance() == 0.5
    g = TASKS["grounding"].chance()
    assert 0.0 < g < 0.1 and TASKS["grounding"].chance() == g  # fixed-seed Monte-Carlo: reproducible


def test_iou_hand_values() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_generated_split_reads_back_as_samples(tmp_path: Path) -> None:
    for task in TASKS:
        path = write_split(task, 12, 0, tmp_path, split="val")
        ds = read_file(path)
        assert len(ds) == 12 and ds.n_skipped == 0
        assert {s.problem_type for s in ds} == {TASKS[task].problem_type} and {s.task for s in ds} == {task}
        assert all(s.response == f"<answer>{s.answer}</answer>" for s in ds)


def test_bad_params_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown parameter.*colours; valid: size, min_count, max_count"):
        write_split("counting", 2, 0, tmp_path, colours=3)
    with pytest.raises(ValueError, match="min_count <= max_count"):
        TASKS["counting"].chance(min_count=5, max_count=2)
    with pytest.raises(ValueError, match="unknown synthetic task 'mazes'; valid: counting, chart"):
        write_split("mazes", 2, 0, tmp_path)
    with pytest.raises(ValueError, match="could not place"):
        TASKS["counting"].generate(random.Random(0), 0, min_count=40, max_count=40)


def test_synth_main_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = synth_main("compare", 4, 0, str(tmp_path), split="test")
    assert capsys.readouterr().out.strip() == str(path) and path == tmp_path / "compare" / "test.jsonl"
    assert len(records(path)) == 4
