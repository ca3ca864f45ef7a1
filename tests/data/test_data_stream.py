"""Streaming a dataset through a shuffle buffer: deterministic, bounded, and resumed exactly from its state."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from framework_shapes import colour, hf_image

from vlrl.data import DataError, load_image
from vlrl.data.embedded import parse_ref
from vlrl.data.stream import SampleStream

ROWS = (40, 40, 40)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Three parquet shards of text-and-small-image rows, ids "r{i}" in file order."""
    (tmp_path / "ds" / "data").mkdir(parents=True)
    i = 0
    for k, n in enumerate(ROWS):
        rows = []
        for _ in range(n):
            rows.append({"id": f"r{i}", "images": [hf_image(colour(i), f"{i}.png")] if i % 2 else [],
                         "problem": f"Question {i}", "answer": str(i)})
            i += 1
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / f"train-{k:05d}-of-00003.parquet",
                       row_group_size=7)
    return tmp_path / "ds"


def ids(samples: list) -> list[str]:
    return [s.id for s in samples]


def test_one_pass_in_file_order(shards: Path) -> None:
    """buffer_size 1 and one epoch: every row once, as the files hold them (what curation reads)."""
    stream = SampleStream(str(shards), buffer_size=1, epochs=1, seed=0)
    order = stream.order(0)
    got = list(stream)
    expected = [f"r{40 * k + i}" for k in order for i in range(40)]
    assert ids(got) == expected
    assert all(s.metadata["source"].endswith(f"-of-00003.parquet:{int(s.id[1:]) % 40 + 1}") for s in got)
    assert got[1].images == [] or parse_ref(got[1].images[0]) is not None
    with_image = next(s for s in got if s.images)
    n = int(with_image.id[1:])
    assert load_image(with_image.images[0]).getpixel((0, 0)) == colour(n)
    assert with_image.messages[0]["content"] == f"<image>Question {n}" and with_image.answer == str(n)


def test_shuffled_deterministic_and_bounded(shards: Path) -> None:
    a = SampleStream(str(shards), seed=3, buffer_size=16)
    first = ids(a.take(300))
    assert len(a.buffer) == 15  # held between draws: the buffer less the one drawn, whatever the data size
    assert first == ids(SampleStream(str(shards), seed=3, buffer_size=16).take(300))
    assert first != ids(SampleStream(str(shards), seed=4, buffer_size=16).take(300))
    assert len(set(first[:104])) == 104  # the first 120 - 16 draws all come from the first epoch
    assert first[:104] != sorted(first[:104], key=lambda x: int(x[1:]))  # shuffled
    assert {int(x[1:]) for x in first} == set(range(120))


@pytest.mark.parametrize("stop", [1, 57, 119, 121, 250])
def test_resume_from_the_saved_state_is_exact(shards: Path, stop: int) -> None:
    whole = ids(SampleStream(str(shards), seed=5, buffer_size=16).take(300))
    before = SampleStream(str(shards), seed=5, buffer_size=16)
    head = ids(before.take(stop))
    state = json.loads(json.dumps(before.state_dict()))  # as a checkpoint stores it
    after = SampleStream(str(shards), seed=5, buffer_size=16, state=state)
    assert head + ids(after.take(300 - stop)) == whole


def test_state_of_other_data_is_refused(shards: Path) -> None:
    state = SampleStream(str(shards), seed=5, buffer_size=16).state_dict()
    with pytest.raises(DataError, match="other data files, seed or buffer_size"):
        SampleStream(str(shards), seed=6, buffer_size=16, state=state)


def test_invalid_rows_raise_or_are_counted(shards: Path) -> None:
    shard = shards / "data" / "train-00001-of-00003.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[4]["images"] = [{"bytes": b"not an image", "path": "x.png"}]
    pq.write_table(pa.Table.from_pylist(rows), shard)
    with pytest.raises(DataError, match="unreadable image") as info:
        list(SampleStream(str(shards), buffer_size=1, epochs=1))
    assert (info.value.path, info.value.line, info.value.field) == (str(shard), 5, "images[0]")
    stream = SampleStream(str(shards), buffer_size=4, epochs=1, skip_invalid=True)
    assert len(list(stream)) == 119 and stream.n_skipped == 1
