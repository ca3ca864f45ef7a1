"""Readers of the frameworks' shapes (EasyR1 / HF shards, verl, SophiaVL-R1's registry), embedded images, and the
file:row: field errors of their malformed variants."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from framework_shapes import (
    SIZE,
    Expected,
    bomb_png,
    colour,
    hf_image,
    png_bytes,
    write_easyr1,
    write_sophiavl,
    write_verl,
)

from vlrl.data import DataError, Sample, image_size, load_dataset, load_image, read_file
from vlrl.data.embedded import parse_ref
from vlrl.data.formats import detect_format


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def check_against(samples: list[Sample], expected: list[Expected]) -> None:
    """Ids, answers, problem types and image counts as written; each image decodes to the colour written."""
    assert [s.id for s in samples] == [e.id for e in expected]
    assert [s.answer for s in samples] == [e.answer for e in expected]
    assert [s.problem_type for s in samples] == [e.problem_type for e in expected]
    assert [len(s.images) for s in samples] == [len(e.colours) for e in expected]
    for s, e in zip(samples, expected):
        user = "".join(m["content"] for m in s.messages if m["role"] == "user")
        assert user.count("<image>") == len(e.colours)
        for image, c in zip(s.images, e.colours):
            loaded = load_image(image)
            assert loaded.size == SIZE and close(loaded.getpixel((5, 5)), c), (s.id, image)


def test_easyr1_shards_read_as_one_dataset_with_lazy_images(tmp_path: Path) -> None:
    expected = write_easyr1(tmp_path / "geo3k")
    ds = load_dataset(str(tmp_path / "geo3k"))  # train by default: data/ holds train and test shards
    assert ds.source == str(tmp_path / "geo3k") and len(ds) == 7
    check_against(ds.samples, expected["train"])
    first = ds[0].images[0]
    ref = parse_ref(first)
    assert ref is not None and first == f"parquet:{tmp_path}/geo3k/data/train-00000-of-00002.parquet:1:images[0]"
    assert (ref.row, ref.column, ref.index) == (1, "images", 0)
    assert len(pickle.dumps(ds.samples)) < 8000  # references, not the bytes of 9 images
    assert image_size(ds[1].images[1]) == SIZE
    assert load_image(first, min_pixels=112 * 112, max_pixels=112 * 112).size == (112, 112)
    test = load_dataset(f"{tmp_path / 'geo3k'}@test")
    check_against(test.samples, expected["test"])
    assert ds[0].metadata["source"] == f"{tmp_path}/geo3k/data/train-00000-of-00002.parquet:1"


def test_shards_glob_and_unknown_split(tmp_path: Path) -> None:
    expected = write_easyr1(tmp_path / "geo3k")
    ds = load_dataset(str(tmp_path / "geo3k" / "data" / "train-*.parquet"))
    check_against(ds.samples, expected["train"])
    with pytest.raises(DataError, match="no split 'validation' here; splits: test, train") as info:
        load_dataset(f"{tmp_path / 'geo3k'}@validation")
    assert info.value.field == "split"


def test_references_in_jsonl_resolve(tmp_path: Path) -> None:
    """Curation writes the kept records with the image strings of their Samples: references stay readable."""
    write_easyr1(tmp_path / "geo3k")
    src = load_dataset(str(tmp_path / "geo3k"))[1]
    record = {"id": "k", "image": src.images, "conversations": [{"from": "human", "value": src.messages[0]["content"]}],
              "answer": src.answer}
    (tmp_path / "kept.jsonl").write_text(json.dumps(record) + "\n")
    kept = read_file(tmp_path / "kept.jsonl")[0]
    assert kept.images == src.images and len(kept.images) == 2
    broken = dict(record, image=[src.images[0].replace(":2:images[0]", ":99:images[0]")])
    (tmp_path / "kept.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(DataError, match="no such cell") as info:
        read_file(tmp_path / "kept.jsonl")
    assert (info.value.line, info.value.field) == (1, "image[0]")


def test_problem_solution_rows_with_an_image_column(tmp_path: Path) -> None:
    """R1-V-style rows (problem / solution / image): read as SophiaVL's shape, the picture from `image`."""
    (tmp_path / "a.png").write_bytes(png_bytes(colour(3)))
    rows = [{"image": "a.png", "problem": "How many?", "solution": "<answer> 3 </answer>"}]
    (tmp_path / "r1v.json").write_text(json.dumps(rows))
    s = read_file(tmp_path / "r1v.json")[0]
    assert (s.images, s.answer, s.problem_type) == ([str(tmp_path / "a.png")], "3", "numerical")
    assert s.messages == [{"role": "user", "content": "<image>How many?"}]


def test_detection_of_the_framework_formats() -> None:
    assert detect_format({"images": [], "problem": "<image>x", "answer": "1"}, "parquet") == "easyr1"
    assert detect_format({"prompt": "x", "answer": "1"}, "parquet") == "easyr1"
    assert detect_format({"prompt": [], "reward_model": {}, "images": []}, "parquet") == "verl"
    assert detect_format({"problem": "x", "solution": "<answer>1</answer>", "path": "a.jpg"}, "json") == "sophiavl"


def test_raw_bytes_column_and_single_image_struct(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    rows = [{"image": png_bytes(colour(1)), "prompt": "What?", "answer": "yes"},
            {"image": hf_image(colour(2), "b.png"), "prompt": "<image>And?", "answer": "no"}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    s = read_file(path)[0]
    assert s.images == [f"parquet:{path}:1:image"] and s.messages[0]["content"] == "<image>What?"
    assert s.problem_type == "yes_no" and close(load_image(s.images[0]).getpixel((0, 0)), colour(1))
    pq.write_table(pa.Table.from_pylist(rows[1:]), path)
    s = read_file(path, format="hf")[0]
    assert s.images == [f"parquet:{path}:1:image"] and close(load_image(s.images[0]).getpixel((0, 0)), colour(2))


def test_verl_rows(tmp_path: Path) -> None:
    expected = write_verl(tmp_path / "verl" / "train.parquet", 0, 5)
    ds = load_dataset(str(tmp_path / "verl" / "train.parquet"))
    check_against(ds.samples, expected)
    s = ds[1]
    assert s.messages == [{"role": "system", "content": "Think first."},
                          {"role": "user", "content": "<image><image>Question 1?"}]
    assert s.task == "hiyouga/geometry3k" and s.response is None
    assert s.metadata["ability"] == "multiple choice" and s.metadata["reward_style"] == "rule"
    assert s.metadata["extra_info"] == {"split": "train", "index": 1, "answer": "B", "question": "Question 1?"}
    assert s.images[1] == f"parquet:{tmp_path}/verl/train.parquet:2:images[1]"


def test_sophiavl_dataset_info_verbatim(tmp_path: Path) -> None:
    expected = write_sophiavl(tmp_path / "sophia")
    registry = str(tmp_path / "sophia" / "dataset_info.json")
    ds = load_dataset("demo", registry=registry)
    check_against(ds.samples, expected["train"])
    mc = ds[1]
    assert mc.messages[0]["content"] == "<image>Question 1 about the picture?\nA. Yes\nB. No\nC. Maybe"
    assert mc.metadata["options"] == ["Yes", "No", "Maybe"] and mc.task == "viquae"
    assert ds[0].problem_type == "free_form" and ds[0].answer == "Lee Harvey Oswald"  # problem_type "text"
    assert ds[3].images == [] and ds[3].messages[0]["content"] == "Question 3 about the picture?"  # data_type text
    assert ds[0].images == [str(tmp_path / "sophia" / "datasets" / "Knowledge" / "viquae" / "images" / "img-0.jpg")]


def test_sophiavl_paths_relative_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SophiaVL-R1 keeps dataset_info.json in verl/data/ and resolves its paths from the repository root."""
    write_sophiavl(tmp_path / "repo")
    info = json.loads((tmp_path / "repo" / "dataset_info.json").read_text())
    info["demo"]["file_path"] = "demo.json"
    (tmp_path / "repo" / "verl" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "verl" / "data" / "dataset_info.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path / "repo")
    ds = load_dataset("demo", registry="verl/data/dataset_info.json")
    assert len(ds) == 8 and ds[0].images[0].startswith(str(tmp_path / "repo" / "datasets"))


def test_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"images": [[hf_image(colour(i), f"{i}.png")] for i in range(3)],
            "problem": [f"<image>Q{i}" for i in range(3)], "answer": [str(i) for i in range(3)]}
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                               "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()},
                                                                  features=features)})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(str(tmp_path / "saved"))
    assert [s.answer for s in ds] == ["0", "1", "2"] and [len(s.images) for s in ds] == [1, 1, 1]
    assert ds[2].images[0].startswith(f"arrow:{tmp_path}/saved/train/data-00000-of-00001.arrow:3:images[0]")
    assert all(close(load_image(s.images[0]).getpixel((0, 0)), colour(i)) for i, s in enumerate(ds))
    assert len(load_dataset(f"{tmp_path / 'saved'}@test")) == 1


# --- malformed variants: file:row: field ----------------------------------------------------------------------

def expect_error(spec: str | Path, file: Path, row: int, field: str, match: str, **kw: Any) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(str(spec), **kw)
    err = info.value
    assert (err.path, err.line, err.field) == (str(file), row, field)
    assert str(err).startswith(f"{file}:{row}: field '{field}': ")


def _easyr1_with(tmp_path: Path, row: int, **changes: Any) -> Path:
    """The EasyR1 shards with row `row` (1-based) of the second train shard changed."""
    write_easyr1(tmp_path / "geo3k")
    shard = tmp_path / "geo3k" / "data" / "train-00001-of-00002.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[row - 1].update(changes)
    pq.write_table(pa.Table.from_pylist(rows), shard)
    return shard


def test_undecodable_bytes_in_a_shard(tmp_path: Path) -> None:
    shard = _easyr1_with(tmp_path, 2, images=[{"bytes": b"GIF89a not really", "path": "x.gif"}] * 2)
    expect_error(tmp_path / "geo3k", shard, 2, "images[0]", "unreadable image")


def test_decompression_bomb_in_a_shard(tmp_path: Path) -> None:
    shard = _easyr1_with(tmp_path, 1, images=[{"bytes": bomb_png(), "path": "bomb.png"}])
    expect_error(tmp_path / "geo3k", shard, 1, "images[0]", "refused as a decompression bomb")


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"images": [hf_image(colour(0), "a.png")], "problem": "<image>Q"}]), path)
    expect_error(path, path, 1, "answer", "missing column", format="easyr1")
    verl = tmp_path / "verl.parquet"
    write_verl(verl, 0, 2)
    table = pq.read_table(verl).drop_columns(["reward_model"])
    pq.write_table(table, verl)
    expect_error(verl, verl, 1, "reward_model", "missing column", format="verl")


def test_placeholder_count_and_bad_verl_role(tmp_path: Path) -> None:
    shard = _easyr1_with(tmp_path, 3, problem="<image><image>two placeholders, one image")
    expect_error(tmp_path / "geo3k", shard, 3, "problem", "2 <image> placeholder")
    verl = tmp_path / "v.parquet"
    rows, _ = __import__("framework_shapes").verl_rows(0, 2)
    rows[1]["prompt"][0]["role"] = "tool"
    pq.write_table(pa.Table.from_pylist(rows), verl)
    expect_error(verl, verl, 2, "prompt[0].role", "unknown role 'tool'")


def test_bomb_refused_when_loaded_under_a_lower_limit(tmp_path: Path) -> None:
    """The limit applies when the image is loaded too: the reference names file:row: field."""
    write_easyr1(tmp_path / "geo3k")
    ref = load_dataset(str(tmp_path / "geo3k"))[0].images[0]
    with pytest.raises(DataError, match="refused as a decompression bomb") as info:
        load_image(ref, max_image_pixels=SIZE[0] * SIZE[1] - 1)
    assert str(info.value).startswith(f"{tmp_path}/geo3k/data/train-00000-of-00002.parquet:1: field 'images[0]': ")


def test_skip_invalid_counts_bad_rows_of_every_shard(tmp_path: Path) -> None:
    _easyr1_with(tmp_path, 3, images=[{"bytes": b"", "path": "x.png"}])
    ds = load_dataset(str(tmp_path / "geo3k"), skip_invalid=True)
    assert len(ds) == 6 and ds.n_skipped == 1
    assert ds.errors == [f"{tmp_path}/geo3k/data/train-00001-of-00002.parquet:3: field 'images[0]': "
                         "unreadable image: the image bytes are empty"]


def test_sophiavl_unknown_problem_type_and_video(tmp_path: Path) -> None:
    write_sophiavl(tmp_path / "s")
    rows = json.loads((tmp_path / "s" / "demo.json").read_text())
    rows[2]["problem_type"] = "essay"
    rows[4]["data_type"] = "video"
    (tmp_path / "s" / "demo.json").write_text(json.dumps(rows))
    registry = str(tmp_path / "s" / "dataset_info.json")
    expect_error("demo", tmp_path / "s" / "demo.json", 3, "problem_type", "unknown problem_type 'essay'",
                 registry=registry)
    ds = load_dataset("demo", registry=registry, skip_invalid=True)
    assert ds.n_skipped == 2 and "field 'data_type': video rows are not supported" in ds.errors[1]


def test_shard_names_as_the_hub_writes_them(tmp_path: Path) -> None:
    """push_to_hub's hashed shard names, and the Hub's parquet conversion (one folder per split)."""
    table = pa.Table.from_pylist([{"images": [hf_image(colour(0), "a.png")], "problem": "<image>Q", "answer": "1"}])
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for name in ("train-00000-of-00002-5a2ba4d3c9a2b1ac", "train-00001-of-00002-0b1c2d3e4f5a6b7c",
                 "test-00000-of-00001-99aa88bb77cc66dd"):
        pq.write_table(table, tmp_path / "hub" / "data" / f"{name}.parquet")
    assert len(load_dataset(str(tmp_path / "hub"))) == 2 and len(load_dataset(f"{tmp_path / 'hub'}@test")) == 1
    for split in ("train", "validation"):
        (tmp_path / "conv" / split).mkdir(parents=True)
        pq.write_table(table, tmp_path / "conv" / split / "0000.parquet")
    assert load_dataset(f"{tmp_path / 'conv'}@validation")[0].id == "0000-1"
