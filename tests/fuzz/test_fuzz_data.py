"""Fuzzing the data readers: whatever a data file, registry or score input holds, reading it gives Samples or a
`DataError` naming the file and the line (and the field, where one field is at fault), never another exception.

Records are built per supported format (VLM-R1 / LLaVA conversations, column maps, MATH-V, NLVR, EasyR1, SophiaVL,
verl with its `vlrl` JSON) with every value sometimes hostile: model special tokens, lone surrogates, text over
`max_text_chars`, nesting past `max_depth` or the JSON parser's limit, odd types, image paths that climb out of the
root or name a directory, embedded-image references to nowhere. Properties, per case: only `DataError`; a record's
error names its file and line; every message is encodable UTF-8 of bounded length (it is printed); a Sample's text
holds no reserved token; the case holds the time and memory bounds of `limits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fuzzing import fuzz_settings, limits
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image

from vlrl.data import DataError, read_file
from vlrl.data.checks import holds_box, names_an_option
from vlrl.data.formats import FORMATS
from vlrl.data.images import image_size
from vlrl.data.registry import load_registry
from vlrl.data.screen import RESERVED_TOKENS
from vlrl.rewards.choice import LETTERS, gold_letter
from vlrl.rewards.grounding import _gold_boxes
from vlrl.rewards.score import read_score_input

MAX_MESSAGE = 4000  # characters: an error message is printed; it quotes values only in part

HOSTILE_TEXT = [
    *RESERVED_TOKENS, "\ud800", "a\udfffb", "<image>", "<image><image>", "<image1>", "<answer>1</answer>", "",
    " ", "A", "B", "(C)", "E", "yes", "true", "false", "1", "-3.5", "[1, 2, 30, 40]", "cat", "\x00", "\u200b",
    "x" * 100_001, "ok.png", "../ok.png", "../../../../../../etc/passwd", "/etc/passwd", "pics", "gone.png",
    "parquet:/nowhere.parquet:1:image", "arrow:/nowhere.arrow:3:images[2]", "file://ok.png", "human", "gpt", "user",
    "assistant", "system", "robot", "multiple choice", "grounding", "numerical", "free-form", "OCR", "video", "text",
]  # fmt: skip
_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=20))
_scalar = st.one_of(_text, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none())
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
                      max_leaves=8)
_image = st.one_of(st.sampled_from(["ok.png", "../ok.png", "pics", "gone.png", "bad.png", "ok.png", "ok.png"]),
                   st.lists(st.sampled_from(["ok.png", "bad.png", "pics"]), max_size=3),
                   st.fixed_dictionaries({"path": st.sampled_from(["ok.png", "x"])}), _value)


def _sometimes(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value for the key, sometimes anything at all."""
    return st.one_of(plausible, plausible, plausible, _value)


_turn = st.fixed_dictionaries({"from": _sometimes(st.sampled_from(["human", "gpt", "system"])),
                               "value": _sometimes(_text)})
_message = st.fixed_dictionaries({"role": _sometimes(st.sampled_from(["user", "assistant", "system"])),
                                  "content": _sometimes(st.one_of(_text, st.just([{"type": "image"},
                                                                                 {"type": "text", "text": "Q"}])))})
_options = _sometimes(st.lists(_text, max_size=4))
_ptype = _sometimes(st.sampled_from(["multiple_choice", "grounding", "numerical", "free_form", "yes_no", "math"]))


def _vlrl_json(value: Any) -> str:
    return json.dumps({"problem_type": "numerical", "metadata": {}, "messages": value})


_nested_json = st.integers(60, 3000).map(lambda n: '{"problem_type": "numerical", "m": ' + "[" * n + "]" * n + "}")


RECORDS = {
    "vlmr1": st.fixed_dictionaries(
        {"image": _image, "conversations": _sometimes(st.lists(_turn, min_size=1, max_size=3))},
        optional={"id": _value, "answer": _value, "problem_type": _ptype, "options": _options}),
    "columns": st.fixed_dictionaries({"question": _sometimes(_text), "answer": _value},
                                     optional={"image": _image, "problem_type": _ptype}),
    "mathv": st.fixed_dictionaries({"question": _sometimes(_text), "options": _options, "answer": _value,
                                    "subject": _text, "level": _value, "image": _image}),
    "nlvr": st.fixed_dictionaries({"sentence": _sometimes(_text), "label": _value, "identifier": _value,
                                   "image": _image}),
    "easyr1": st.fixed_dictionaries({"problem": _sometimes(_text), "answer": _value},
                                    optional={"images": _image, "options": _options, "problem_type": _ptype,
                                              "data_type": _value,
                                              "vlrl": _value.map(_vlrl_json) | _value | _nested_json}),
    "sophiavl": st.fixed_dictionaries({"problem": _sometimes(_text), "solution": _sometimes(_text)},
                                      optional={"path": _image, "problem_type": _ptype, "options": _options}),
    "verl": st.fixed_dictionaries(
        {"prompt": _sometimes(st.lists(_message, min_size=1, max_size=3)), "images": _image,
         "reward_model": _sometimes(st.fixed_dictionaries({"ground_truth": _value}))},
        optional={"extra_info": _sometimes(st.fixed_dictionaries({"vlrl": _value.map(_vlrl_json)})),
                  "ability": _value, "data_source": _value}),
    "any": st.dictionaries(_text, _value, max_size=5),
}


def _deep(n: int) -> str:
    return '{"question": "q", "answer": "1", "x": ' + "[" * n + "]" * n + "}"


# a record as its JSON text: mostly one of the formats, sometimes nested past max_depth or the parser's limit
_line = st.one_of(st.sampled_from(list(RECORDS)).flatmap(lambda f: RECORDS[f]).map(json.dumps),
                  st.integers(60, 5000).map(_deep), st.sampled_from(["[]", "1", '"x"', "{", "null"]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_data") / "data"
    root.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "ok.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root.parent / "ok.png")
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    (root / "pics").mkdir()
    return root


def check_error(err: DataError, path: Path, record_level: bool = True) -> None:
    """A reader's error names the file (and the line of a record); its text prints and stays short."""
    assert err.path is not None and Path(err.path).name in (path.name, "ok.png", "bad.png", "pics")
    if record_level:
        assert err.line is not None, str(err)
    text = str(err)
    text.encode("utf-8")
    assert len(text) < MAX_MESSAGE, text[:300]


def read_checked(path: Path, **kwargs: Any) -> None:
    """Read `path` both ways (stop at the first error; skip invalid records) and check what comes out."""
    for skip in (False, True):
        try:
            ds = read_file(path, skip_invalid=skip, **kwargs)
        except DataError as err:
            check_error(err, path, record_level=err.line is not None or skip)
            continue
        for sample in ds:
            texts = [m["content"] for m in sample.messages] + [sample.response or ""]
            assert not any(t in text for t in RESERVED_TOKENS for text in texts)
            json.dumps(sample.metadata, ensure_ascii=False, default=str).encode("utf-8")  # writers can write it
        for message in ds.errors:
            message.encode("utf-8")
            assert len(message) < MAX_MESSAGE


@fuzz_settings(examples=200)
@given(lines=st.lists(_line, min_size=1, max_size=4), fmt=st.sampled_from([None, None, *FORMATS]))
def test_jsonl_records(folder: Path, lines: list[str], fmt: str | None) -> None:
    path = folder / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with limits("data.read_jsonl"):
        read_checked(path, format=fmt)


@fuzz_settings(examples=75)
@given(lines=st.lists(_line, min_size=1, max_size=4))
def test_json_list_records(folder: Path, lines: list[str]) -> None:
    path = folder / "d.json"
    path.write_text("[\n" + ",\n".join(lines) + "\n]", encoding="utf-8")
    with limits("data.read_json_list"):
        read_checked(path)


@fuzz_settings(examples=60)
@given(record=st.sampled_from([k for k in RECORDS if k != "any"]).flatmap(lambda f: RECORDS[f]))
def test_parquet_rows(folder: Path, record: dict[str, Any]) -> None:
    path = folder / "d.parquet"
    try:
        pq.write_table(pa.Table.from_pylist([record, record]), path)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        assume(False)  # a row pyarrow cannot store is no parquet file
        return
    with limits("data.read_parquet"):
        read_checked(path)


_registry_value = st.one_of(_value, st.sampled_from(["d.jsonl", "vlmr1", "answer", "train", "datasets"]))
_entry = st.dictionaries(
    st.sampled_from(["file", "file_path", "format", "image_root", "image_base_path", "columns", "problem_type",
                     "template", "split", "allow_outside_image_root", "max_text_chars", "other"]),
    _registry_value, max_size=5)


_good_entry = st.fixed_dictionaries(
    {"file": st.just("d.jsonl")},
    optional={"format": _registry_value, "template": _registry_value, "columns": st.one_of(
        _value, st.dictionaries(st.one_of(st.sampled_from(["question", "answer", "image"]), _text, st.integers()),
                                _registry_value, max_size=3)), "problem_type": _registry_value,
              "allow_outside_image_root": _registry_value, "max_text_chars": _registry_value})


@fuzz_settings(examples=75)
@given(entries=st.one_of(st.dictionaries(_text, _entry | _good_entry, max_size=3), _value), as_json=st.booleans(),
       raw=st.one_of(st.none(), st.text(max_size=40)))
def test_registry_files(folder: Path, entries: Any, as_json: bool, raw: str | None) -> None:
    path = folder / ("registry.json" if as_json else "registry.yaml")
    text = raw if raw is not None else json.dumps(entries)  # JSON is YAML too
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with limits("data.registry"):
        try:
            load_registry(path)
        except DataError as err:
            check_error(err, path, record_level=False)


@fuzz_settings(examples=40)
@given(row=st.integers(-1, 5), column=st.sampled_from(["image", "images", "question", "nope"]),
       index=st.one_of(st.none(), st.integers(0, 3)), text=st.one_of(st.none(), st.text(max_size=60)))
def test_embedded_image_refs(folder: Path, row: int, column: str, index: int | None, text: str | None) -> None:
    path = folder / "refs.parquet"
    if not path.exists():
        png = (folder / "ok.png").read_bytes()
        pq.write_table(pa.Table.from_pylist([{"image": png, "images": [png, b"junk"], "question": "q"}] * 3), path)
    ref = text if text is not None else f"parquet:{path}:{row}:{column}" + ("" if index is None else f"[{index}]")
    with limits("data.embedded_ref"):
        try:
            image_size(ref)
        except DataError as err:
            if text is None:  # a ref a reader built (from screened text) prints
                str(err).encode("utf-8")
            assert len(str(err)) < MAX_MESSAGE


_score_record = st.fixed_dictionaries(
    {"completion": _sometimes(_text), "answer": _value, "problem_type": _ptype},
    optional={"metadata": _value, "options": _options, "image_size": _value, "coord_space": _value,
              "expected": _value})


@fuzz_settings(examples=100)
@given(lines=st.lists(st.one_of(_score_record.map(json.dumps), st.integers(60, 5000).map(_deep)), max_size=3))
def test_score_input(folder: Path, lines: list[str]) -> None:
    path = folder / "score.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with limits("data.score_input"):
        try:
            read_score_input(path)
        except DataError as err:
            check_error(err, path)


_answer_piece = st.one_of(st.sampled_from(["[", "]", "(", ")", ",", " ", "1", "-2.5", "1e3", "300", "{", "}",
                                           '"bbox_2d": ', "<box>", "</box>", "none", "A", "(B)", "c.", "E", "°",
                                           "dog", "Dog", "145", "1.0", "\\boxed{", "$", "**", "：", "（"]),
                          st.text(max_size=4))
_answer = st.lists(_answer_piece, min_size=1, max_size=8).map("".join)


@fuzz_settings(examples=150)
@given(answer=_answer)
def test_a_grounding_answer_refused_at_read_time_is_one_no_reward_can_score(answer: str) -> None:
    """The readers refuse only what the grounding rewards could never score (their gold parser finds no box)."""
    with limits("data.grounding_answer_check"):
        if not holds_box(answer):
            assert _gold_boxes(answer, True) is None, answer


@fuzz_settings(examples=150)
@given(answer=_answer, options=st.lists(st.one_of(_answer, st.sampled_from(["dog", "cat", "145°", "1"])),
                                        min_size=1, max_size=5))
@example(answer="B", options=["A:B"])  # found in CI: `B` is the text of option `A:B` once its own letter is cut
def test_a_choice_answer_refused_at_read_time_is_one_no_reward_can_score(answer: str, options: list[str]) -> None:
    """The readers refuse only multiple-choice golds the choice reward cannot read (`gold_letter` is None)."""
    with limits("data.choice_answer_check"):
        if not names_an_option(answer, options):
            assert gold_letter(answer, {LETTERS[i]: o for i, o in enumerate(options)}) is None, (answer, options)
