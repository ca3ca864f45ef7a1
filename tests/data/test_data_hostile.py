"""Hostile data files (issue 18): huge text, model special tokens, lone surrogates, deep nesting, images that are
directories, symlink loops or outside `image_root`, answers a reward can never match. Each is refused by the reader
with `file:line: field`, and `skip_invalid` skips it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlrl.data import DataError, load_dataset, read_file
from vlrl.data.screen import DEFAULT_MAX_LINE_BYTES, RESERVED_TOKENS, TextLimits
from vlrl.rewards.score import ScoreInputError, score_file


def png(path: Path) -> Path:
    Image.new("RGB", (16, 16), (0, 128, 0)).save(path)
    return path


def lines(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def record(i: int, question: str = "<image>Q?", **extra: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "image": "ok.png",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "<answer>1</answer>"}],
            **extra}


def refused(path: Path, line: int | None, field: str | None, match: str, **kwargs: Any) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        read_file(path, **kwargs)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)
    return info.value


def skipped(path: Path, n_good: int, **kwargs: Any) -> None:
    ds = read_file(path, skip_invalid=True, **kwargs)
    assert (len(ds), ds.n_skipped) == (n_good, 1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    png(tmp_path / "ok.png")
    return tmp_path


# finding 4: unbounded text


def test_a_text_field_over_max_text_chars_is_refused(root: Path) -> None:
    path = lines(root / "d.jsonl", [record(1), record(2, "<image>" + "x" * 100_001)])
    refused(path, 2, "conversations[0].value", "100008 characters.*max_text_chars=100000")
    skipped(path, 1)
    assert len(read_file(path, limits=TextLimits(max_text_chars=200_000))) == 2  # the bound is a setting
    registry = root / "registry.yaml"
    registry.write_text("long:\n  file: d.jsonl\n  max_text_chars: 200000\nbad:\n  file: d.jsonl\n"
                        "  max_text_chars: -1\n")
    with pytest.raises(DataError, match="bad.max_text_chars"):
        load_dataset("long", registry=str(registry))
    registry.write_text("long:\n  file: d.jsonl\n  max_text_chars: 200000\n")
    assert len(load_dataset("long", registry=str(registry))) == 2


def test_a_line_over_max_line_bytes_is_refused_before_json_parsing(root: Path) -> None:
    huge = '{"id": "big", "image": "ok.png", "conversations": [' + " " * DEFAULT_MAX_LINE_BYTES + "]}"
    path = lines(root / "d.jsonl", [record(1), huge, record(3)])
    refused(path, 2, None, "longer than max_line_bytes")
    skipped(path, 2)


# finding 6: model special tokens in text


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<IMG_CONTEXT>", "<img>", "</img>"])
def test_a_reserved_token_in_a_prompt_is_refused(root: Path, token: str) -> None:
    path = lines(root / "d.jsonl", [record(1), record(2, f"<image>what is {token}?")])
    refused(path, 2, "conversations[0].value", f"reserved token {token!r}")
    skipped(path, 1)


def test_a_reserved_token_in_the_demonstration_or_a_column_is_refused(root: Path) -> None:
    bad = record(1)
    bad["conversations"][1]["value"] = "<answer><|vision_end|></answer>"
    refused(lines(root / "d.jsonl", [bad]), 1, "conversations[1].value", "reserved token")
    rows = [{"question": "how many <|video_pad|>?", "answer": "2"}]
    refused(lines(root / "c.jsonl", rows), 1, "question", "reserved token")


def test_a_reserved_token_in_metadata_only_is_kept(root: Path) -> None:
    """Metadata never reaches the model: a note mentioning `<img>` (HTML) is harmless."""
    assert len(read_file(lines(root / "d.jsonl", [record(1, note="<img> tag")]))) == 1


def test_reserved_tokens_cover_every_family() -> None:
    """data/ may not import models/ (a higher layer): its constant must hold every family's tokens."""
    from vlrl.models.families import FAMILIES
    from vlrl.models.families.internvl import INTERNVL_NAMED_TOKENS

    for family in FAMILIES:
        assert {family.image_token, *family.vision_tokens} <= set(RESERVED_TOKENS), family.name
    assert set(INTERNVL_NAMED_TOKENS.values()) <= set(RESERVED_TOKENS)


# finding 7: lone surrogates


def test_a_lone_surrogate_is_refused_with_line_and_field(root: Path) -> None:
    bad = '{"id": "s", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>Q\\ud800?"}, ' \
          '{"from": "gpt", "value": "1"}]}'
    path = lines(root / "d.jsonl", [record(1), bad])
    refused(path, 2, "conversations[0].value", "lone surrogate")
    skipped(path, 1)
    meta = '{"id": "m", "image": "ok.png", "note": ["\\udfff"], "conversations": [{"from": "human", "value": "Q"}, ' \
           '{"from": "gpt", "value": "1"}]}'
    refused(lines(root / "m.jsonl", [meta]), 1, "note[0]", "lone surrogate")


def test_score_refuses_a_surrogate_and_writes_nothing(tmp_path: Path) -> None:
    good = {"completion": "<answer>1</answer>", "answer": "1", "problem_type": "numerical"}
    inp = lines(tmp_path / "in.jsonl", [good, good, '{"completion": "\\ud800", "answer": "1", '
                                                     '"problem_type": "numerical"}'])
    out = tmp_path / "out.jsonl"
    with pytest.raises(ScoreInputError, match="lone surrogate") as info:
        score_file(inp, out, print_summary=False)
    assert isinstance(info.value, DataError) and (info.value.line, info.value.field) == (3, "completion")
    assert not out.exists()


# finding 8: deep nesting


def deep(n: int) -> str:
    return '{"id": "deep", "question": "q", "answer": "1", "x": ' + "[" * n + "]" * n + "}"


@pytest.mark.parametrize("depth", [100_000, 500])
def test_a_deeply_nested_line_is_refused_and_skipped(root: Path, depth: int) -> None:
    path = lines(root / "d.jsonl", [{"question": "q", "answer": "1"}, deep(depth)])
    refused(path, 2, None, "nested deeper than")
    skipped(path, 1)


def test_a_deeply_nested_json_list_names_the_record(root: Path) -> None:
    path = root / "d.json"
    path.write_text('[{"question": "q", "answer": "1"},\n' + deep(100_000) + "]")
    refused(path, 2, None, "nested deeper than")
    skipped(path, 1)


def test_score_refuses_deep_nesting(tmp_path: Path) -> None:
    inp = lines(tmp_path / "in.jsonl", ['{"completion": "1", "answer": "1", "problem_type": "numerical", "x": '
                                        + "[" * 100_000 + "]" * 100_000 + "}"])
    with pytest.raises(ScoreInputError, match="nested deeper than") as info:
        score_file(inp, tmp_path / "out.jsonl", print_summary=False)
    assert info.value.line == 1


# finding 13: images and answers


def test_an_image_that_is_a_directory_says_so(root: Path) -> None:
    (root / "pics").mkdir()
    refused(lines(root / "d.jsonl", [record(1) | {"image": "pics"}]), 1, "image", "is a directory")


def test_an_image_in_a_symlink_loop_says_so(root: Path) -> None:
    os.symlink(root / "loop2.png", root / "loop1.png")
    os.symlink(root / "loop1.png", root / "loop2.png")
    refused(lines(root / "d.jsonl", [record(1) | {"image": "loop1.png"}]), 1, "image", "symlink loop")


def test_an_image_outside_image_root_is_refused_unless_allowed(tmp_path: Path) -> None:
    png(tmp_path / "outside.png")
    data = tmp_path / "data"
    data.mkdir()
    path = lines(data / "d.jsonl", [record(1) | {"image": "../outside.png"}])
    err = refused(path, 1, "image", "outside image_root")
    assert "allow_outside_image_root" in str(err)
    lines(data / "p.jsonl", [record(1) | {"image": "../../../../../../../../etc/passwd"}])
    refused(data / "p.jsonl", 1, "image", "outside image_root")
    assert len(read_file(path, allow_outside_image_root=True)) == 1
    registry = tmp_path / "registry.yaml"
    registry.write_text("ok:\n  file: data/d.jsonl\n  allow_outside_image_root: true\nplain:\n  file: data/d.jsonl\n")
    assert len(load_dataset("ok", registry=str(registry))) == 1
    with pytest.raises(DataError, match="outside image_root"):
        load_dataset("plain", registry=str(registry))


def test_a_grounding_answer_that_is_not_a_box_is_refused(root: Path) -> None:
    rows = [{"problem": "where?", "answer": "[1, 2, 30, 40]", "problem_type": "grounding"},
            {"problem": "where?", "answer": "the cat", "problem_type": "grounding"}]
    path = lines(root / "g.jsonl", rows)
    refused(path, 2, "answer", "not a box")
    skipped(path, 1)


def test_a_choice_answer_not_among_the_options_is_refused(root: Path) -> None:
    rows = [{"problem": "which?", "answer": "B", "options": ["cat", "dog"]},
            {"problem": "which?", "answer": "dog", "options": ["cat", "dog"]},
            {"problem": "which?", "answer": "E", "options": ["cat", "dog", "cow"]},
            {"problem": "which?", "answer": "horse", "options": ["cat", "dog"]}]
    path = lines(root / "c.jsonl", rows[:2] + rows[2:3])
    refused(path, 3, "answer", "not among the options")
    assert len(read_file(path, skip_invalid=True)) == 2
    refused(lines(root / "h.jsonl", rows[3:]), 1, "answer", "not among the options")


@pytest.mark.parametrize("prompt", ["describe <|image_pad|>", "x" * 100_001, "bad \ud800"])
def test_infer_refuses_a_hostile_prompt_before_loading_the_model(tmp_path: Path, prompt: str) -> None:
    from vlrl.eval.infer import infer

    with pytest.raises(DataError) as info:
        infer(str(tmp_path / "no-model"), [], prompt)  # the model folder does not exist: it must not be reached
    assert info.value.field == "prompt"


# fault injection: an image corrupted after the data was read, before a step loads it


def _rl_with_corrupt_image(model: Path, root: Path, monkeypatch: pytest.MonkeyPatch, skip_invalid: bool) -> Path:
    """Two RL steps (B=2, G=2) over 4 records, one image of which is overwritten with garbage right after the
    data is read (so the readers' check passed): both steps together visit every record."""
    from vlrl import recipes_dir
    from vlrl.config import load_config
    from vlrl.train import rl

    for i in range(4):
        Image.new("RGB", (28, 28), (60 * i, 0, 0)).save(root / f"{i}.png")
    data = lines(root / "d.jsonl", [{"question": "<image>How many?", "answer": "1", "image": f"{i}.png"}
                                    for i in range(4)])
    real = rl.load_samples

    def load_then_corrupt(*args: Any, **kwargs: Any) -> Any:
        samples = real(*args, **kwargs)
        if samples and Path(samples[0].images[0]).parent == root:
            (root / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
        return samples

    monkeypatch.setattr(rl, "load_samples", load_then_corrupt)
    over = {"model": model, "data": f"[{data}]", "out": root / "run", "max_steps": 2, "validation.data": "[]",
            "replay.data": "[]", "replay.coef": 0.0, "threads": 1, "rollout.batch_size": 2, "rollout.group_size": 2,
            "rollout.max_new_tokens": 4, "rollout.dynamic_sampling": "false", "algorithm.beta": 0.0,
            "micro_batch_size": 4, "logging.save_every": 0, "logging.log_every": 1, "skip_invalid": skip_invalid}
    cfg = load_config(rl.RLConfig, str(recipes_dir() / "tiny-grpo.yaml"), [f"{k}={v}" for k, v in over.items()])
    return rl.run_rl(cfg)


@pytest.mark.slow
def test_a_corrupt_image_mid_run_stops_the_run_naming_the_image_and_record(tiny_model_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="unreadable image") as info:
        _rl_with_corrupt_image(tiny_model_dir, tmp_path, monkeypatch, skip_invalid=False)
    assert info.value.path == str(tmp_path / "2.png") and "d.jsonl:3" in str(info.value)


@pytest.mark.slow
def test_a_corrupt_image_mid_run_is_skipped_and_counted_under_skip_invalid(tiny_model_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from vlrl.train.logging import read_metrics

    out = _rl_with_corrupt_image(tiny_model_dir, tmp_path, monkeypatch, skip_invalid=True)
    lines_ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(lines_) == 2 and sum(m["data/skipped_images"] for m in lines_) == 1
    assert out.exists()


def test_data_stats_refuses_a_reserved_token_with_exit_2(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vlrl data stats` used to count such a record as fine (exit 0); now it is a data error naming it."""
    from vlrl.cli import main

    path = lines(root / "d.jsonl", [record(1), record(2, "<image><|image_pad|>?")])
    assert main(["data", "stats", str(path)]) == 2
    assert "d.jsonl:2: field 'conversations[0].value'" in capsys.readouterr().err


def test_reserved_tokens_cover_the_tiny_models_processor(tiny_model_dir: Path) -> None:
    from vlrl.models.processor import load_processor, reserved_tokens

    assert set(reserved_tokens(load_processor(tiny_model_dir))) <= set(RESERVED_TOKENS)


def test_a_registry_alias_bomb_is_refused_naming_file_and_line(tmp_path):
    """Finding 9 for registry files: a few lines of anchors and aliases expand to billions of nodes once walked;
    the registry refuses aliases at parse time, naming the file and line."""
    from vlrl.data.registry import load_registry

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    reg = tmp_path / "registry.yaml"
    reg.write_text(bomb)
    with pytest.raises(DataError, match=r"registry.yaml:1: .*anchors and aliases"):
        load_registry(reg)
