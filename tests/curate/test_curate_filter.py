"""`vlrl curate` statistics and band filter: hand-computed values; the resumable results file."""

from __future__ import annotations

import json

import pytest

from vlrl.curate.filter import (
    ItemStats,
    format_report,
    item_stats,
    keep,
    parse_band,
    pass_histogram,
    select,
    summarize,
)
from vlrl.curate.store import ResultLog, drop_torn_tail, merge_parts, part_path, read_results


def test_item_stats_by_hand_greedy():
    st = item_stats([1.0, 0.0, 0.0, 1.0], greedy=0.0)
    assert (st.n, st.n_scored, st.n_pass) == (4, 4, 2)
    assert (st.mean, st.min, st.max) == (0.5, 0.0, 1.0)
    assert (st.pass_rate, st.pass_at_1, st.pass_at_n, st.gap) == (0.5, 0.0, 1.0, 1.0)
    right = item_stats([1.0, 0.0, 0.0, 1.0], greedy=1.0)
    assert (right.pass_at_1, right.gap) == (1.0, 0.0)


def test_item_stats_first_sample_and_threshold_and_unscored():
    st = item_stats([1.0, 0.0, 0.0, 0.0], pass1="first", greedy=0.0)  # greedy is ignored
    assert (st.pass_at_1, st.pass_at_n, st.gap, st.pass_rate) == (1.0, 1.0, 0.0, 0.25)
    st = item_stats([0.4, 0.6, None], threshold=0.5, greedy=None)
    assert (st.n, st.n_scored, st.n_pass) == (3, 2, 1)
    assert st.mean == pytest.approx(0.5) and (st.min, st.max) == (0.4, 0.6)
    assert st.pass_rate == pytest.approx(1 / 3) and (st.pass_at_1, st.pass_at_n) == (0.0, 1.0)
    weighted = item_stats([1.1, 0.1, 0.1, 1.0], threshold=1.0, greedy=1.1)  # accuracy + 0.1 * format
    assert (weighted.n_pass, weighted.pass_at_1) == (2, 1.0) and weighted.mean == pytest.approx(0.575)
    none = item_stats([None, None], greedy=None)
    assert none.mean is None and none.min is None and none.pass_rate == 0.0 and not keep(none, -1.0, 2.0)
    with pytest.raises(ValueError, match="pass1"):
        item_stats([1.0], pass1="best")
    with pytest.raises(ValueError):
        item_stats([])


def _st(rewards: list[float], greedy: float = 0.0) -> ItemStats:
    return item_stats(rewards, greedy=greedy)


def test_keep_is_open_band_and_needs_min_below_max():
    assert keep(_st([0.0, 1.0, 0.0, 0.0]), 0.0, 0.6)  # mean 0.25
    assert not keep(_st([0.0, 0.0, 0.0, 0.0]), 0.0, 0.6)  # mean 0 = LOW: outside the open band
    assert not keep(_st([1.0, 1.0, 0.0, 1.0]), 0.0, 0.75)  # mean 0.75 = HIGH
    assert keep(_st([1.0, 1.0, 0.0, 1.0]), 0.0, 0.76)
    assert not keep(_st([0.5, 0.5, 0.5, 0.5]), 0.0, 1.0)  # in the band but min == max: no GRPO signal
    assert keep(_st([0.5, 0.5, 0.5, 0.6]), 0.0, 1.0)
    assert not keep(_st([-1.0, -1.0]), -2.0, 0.0)
    assert keep(_st([-1.0, 0.0]), -2.0, 0.0)


def test_select_ranks_by_gap_with_ties_in_input_order():
    items = [
        ("a", _st([1.0, 0.0, 0.0, 0.0], greedy=1.0)),  # mean .25, gap 0
        ("b", _st([0.0, 0.0, 0.0, 0.0])),  # mean 0: dropped
        ("c", _st([0.0, 1.0, 0.0, 0.0], greedy=0.0)),  # gap 1
        ("d", _st([1.0, 1.0, 1.0, 0.0], greedy=0.0)),  # mean .75, gap 1
        ("e", _st([1.0, 1.0, 0.0, 0.0], greedy=0.0)),  # mean .5, gap 1
    ]
    assert select(items, (0.0, 0.6)) == ["a", "c", "e"]
    assert select(items, (0.0, 1.0)) == ["a", "c", "d", "e"]
    assert select(items, (0.0, 1.0), rank_by_gap=True) == ["c", "d", "e", "a"]
    assert select(items, (0.0, 1.0), rank_by_gap=True, max_keep=2) == ["c", "d"]
    assert select(items, (0.0, 1.0), max_keep=2) == ["a", "c"]
    assert select(items, (0.0, 1.0), max_keep=0) == []
    with pytest.raises(ValueError):
        select(items, (0.0, 1.0), max_keep=-1)


def test_parse_band():
    assert parse_band("0,0.6") == (0.0, 0.6)
    assert parse_band([0, 0.75]) == (0.0, 0.75)
    for bad in ("0.6,0", "0.5", "a,b", "0,0.5,1", "0.5,0.5"):
        with pytest.raises(ValueError, match="band"):
            parse_band(bad)


def test_histogram_and_summary_by_hand():
    stats = [_st([0.0, 0.0]), _st([1.0, 0.0], greedy=1.0), _st([0.0, 1.0]), _st([1.0, 1.0], greedy=1.0)]
    assert pass_histogram(stats) == {"0/2": 1, "1/2": 2, "2/2": 1}
    s = summarize(stats, kept=2)
    assert (s["n_items"], s["n_kept"], s["kept_fraction"], s["all_pass"], s["none_pass"]) == (4, 2, 0.5, 1, 1)
    assert s["mean_pass_rate"] == 0.5 and s["pass_at_1"] == 0.5 and s["pass_at_n"] == 0.75
    assert s["mean_gap"] == 0.25  # only the third item: pass@N 1, greedy 0
    text = format_report({**s, "band": [0.0, 0.6]})
    assert "kept 2 (50.0%)" in text and "1/2       2" in text


def test_torn_tail_is_cut_and_corrupt_lines_skipped(tmp_path):
    path = part_path(tmp_path, 0)
    lines = [json.dumps({"id": f"x{i}", "v": i}) for i in range(3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:9])
    assert set(read_results(tmp_path)) == {"x0", "x1"}  # the torn line is not an item
    assert drop_torn_tail(path) == 9
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert drop_torn_tail(path) == 0
    with ResultLog(path) as log:  # appends after the cut: no line glued to the fragment
        log.write([{"id": "x2", "v": 2}])
    assert [json.loads(ln)["id"] for ln in path.read_text().splitlines()] == ["x0", "x1", "x2"]
    only = tmp_path / "one.jsonl"
    only.write_text('{"id": "a"')
    assert drop_torn_tail(only) == len('{"id": "a"') and only.read_text() == ""


def test_merge_orders_by_input_keeps_first_copy_and_removes_parts(tmp_path):
    part_path(tmp_path, 0).write_text('{"id": "b", "v": 1}\n{"id": "zz", "v": 0}\nnot json\n')
    part_path(tmp_path, 1).write_text('{"id": "a", "v": 2}\n{"id": "b", "v": 3}\n')
    results = merge_parts(tmp_path, ["a", "b", "c"])
    assert {k: v["v"] for k, v in results.items()} == {"a": 2, "b": 1, "zz": 0}
    merged = [json.loads(ln) for ln in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == ["a", "b", "zz"]
    assert not list(tmp_path.glob("samples.part-*"))
    assert set(read_results(tmp_path)) == {"a", "b", "zz"}
