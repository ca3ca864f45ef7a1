"""Dataset registry: lookup by name, relative paths, overrides, env var, errors listing known names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlrl.data import DataError, load_dataset, load_registry
from vlrl.data.registry import REGISTRY_ENV


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "sets" / "imgs").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "sets" / "imgs" / "a.png")
    rec = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "1"}],
    }
    (tmp_path / "sets" / "conv.jsonl").write_text(
        "".join(json.dumps(rec | {"id": i}) + "\n" for i in range(3))
    )
    rows = [{"q": f"q{i}", "a": str(i)} for i in range(4)]
    (tmp_path / "sets" / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "registry.yaml").write_text(
        "conv:\n"
        "  file: sets/conv.jsonl\n"
        "  format: vlmr1\n"
        "  image_root: sets/imgs\n"
        "  template: thinking\n"
        "  split: train\n"
        "table:\n"
        "  file: sets/table.jsonl\n"
        "  columns: {question: q, answer: a, image: null}\n"
        "  problem_type: numerical\n"
    )
    return tmp_path


def test_lookup_by_name(data: Path) -> None:
    ds = load_dataset("conv", registry=str(data / "registry.yaml"))
    assert len(ds) == 3 and ds.template == "thinking" and ds.split == "train"
    assert ds[0].images == [str((data / "sets" / "imgs" / "a.png").resolve())]
    table = load_dataset("table", registry=str(data / "registry.yaml"), limit=2)
    assert [s.answer for s in table] == ["0", "1"] and {s.problem_type for s in table} == {"numerical"}
    assert table.template is None


def test_json_registry_and_env_var(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = data / "registry.json"
    reg.write_text(
        json.dumps({"t": {"file": "sets/table.jsonl", "columns": {"question": "q", "answer": "a"}}})
    )
    monkeypatch.setenv(REGISTRY_ENV, str(reg))
    assert len(load_dataset("t")) == 4
    assert sorted(load_registry(reg)) == ["t"]


def test_path_spec_bypasses_registry(data: Path) -> None:
    ds = load_dataset(str(data / "sets" / "conv.jsonl"), image_root=str(data / "sets" / "imgs"))
    assert len(ds) == 3 and ds.template is None


def test_unknown_name_lists_known(data: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'.*known: conv, table") as info:
        load_dataset("nope", registry=str(data / "registry.yaml"))
    assert "registry.yaml" in str(info.value)


def test_no_registry_and_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    with pytest.raises(DataError, match=f"no such data file.*{REGISTRY_ENV}"):
        load_dataset("nothing-here")


def test_bad_entries(tmp_path: Path) -> None:
    reg = tmp_path / "r.yaml"
    reg.write_text("x:\n  file: a.jsonl\n  colums: {}\n")
    with pytest.raises(DataError, match="unknown key.*colums.*valid: file, format") as info:
        load_registry(reg)
    assert info.value.field == "x"
    reg.write_text("x:\n  format: vlmr1\n")
    with pytest.raises(DataError, match="field 'x.file': missing required field"):
        load_registry(reg)
    reg.write_text("x:\n  file: a.jsonl\n  template: chatty\n")
    with pytest.raises(DataError, match="unknown template 'chatty'; valid: none, answer, thinking, fast"):
        load_registry(reg)
    reg.write_text("x: [\n")
    with pytest.raises(DataError, match=r"r\.yaml:\d+: invalid registry"):
        load_registry(reg)
    with pytest.raises(DataError, match="registry file not found"):
        load_registry(tmp_path / "missing.yaml")


def test_registered_file_missing(tmp_path: Path) -> None:
    reg = tmp_path / "r.yaml"
    reg.write_text("x:\n  file: gone.jsonl\n")
    with pytest.raises(DataError, match=r"gone\.jsonl: data file not found"):
        load_dataset("x", registry=str(reg))
