from dataclasses import dataclass, field

import pytest

from vlrl.config import (
    ConfigError,
    KeyDoc,
    build,
    config_keys,
    describe_config,
    field_comments,
    load_config,
    save_config,
)


@dataclass
class Inner:
    beta: float = 0.0
    mode: str = "token-mean"


@dataclass
class Cfg:
    model: str
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    data: list[str] = field(default_factory=list)
    opt: Inner = field(default_factory=Inner)
    limit: int | None = None


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlr: 0.1\nopt:\n  beta: 0.04\n")
    cfg = load_config(Cfg, path, ["steps=5", "opt.mode=dapo", "flag=true", "data=[a, b]", "limit=3"])
    assert cfg == Cfg(model="m", lr=0.1, steps=5, flag=True, data=["a", "b"], opt=Inner(0.04, "dapo"), limit=3)


def test_int_given_for_float_is_converted():
    assert load_config(Cfg, None, ["model=m", "lr=1"]).lr == 1.0


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lrr; valid keys: data, flag, limit, lr, model, opt, steps"):
        load_config(Cfg, None, ["model=m", "lrr=1"])
    with pytest.raises(ConfigError, match=r"config.opt: unknown key\(s\) betaa; valid keys: beta, mode"):
        load_config(Cfg, None, ["model=m", "opt.betaa=1"])


def test_type_errors_and_missing_required():
    with pytest.raises(ConfigError, match="config.steps: expected int"):
        load_config(Cfg, None, ["model=m", "steps=abc"])
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(Cfg, None, ["lr=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(Cfg, None, ["model"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Cfg, None, ["model=m", "data=[x]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Cfg, tmp_path / "run" / "config.yaml") == cfg


def test_exponent_without_dot_is_a_float():
    assert load_config(Cfg, None, ["model=m", "lr=2e-3"]).lr == 2e-3


@dataclass
class Checked:
    name: str

    def __post_init__(self):
        if self.name not in ("a", "b"):
            raise KeyError(f"unknown name {self.name!r}; valid: a, b")


@dataclass
class Outer:
    items: list[Checked] = field(default_factory=list)


def test_nested_validation_error_becomes_config_error():
    with pytest.raises(ConfigError, match=r"config.items\[0\]: unknown name 'z'; valid: a, b"):
        load_config(Outer, None, ["items=[{name: z}]"])


@dataclass
class Judge:
    url: str  # where the judge listens
    timeout: float = 5.0  # seconds per call


def make_judge() -> Judge:
    return Judge(url="http://localhost")


@dataclass
class Section:
    on: bool = False  # turn the section on
    judge: Judge = field(default_factory=make_judge)  # the judge


@dataclass
class Documented:
    name: str  # the run's name
    # heading: not a field's description
    lr: float = 1e-3  # learning rate,
    #   continued on the next line
    # another heading, right below a field: not a continuation
    tags: list[str] = field(default_factory=lambda: ["a", "b"])  # labels
    limit: int | None = None
    sec: Section = field(default_factory=Section)  # nested

    def method(self) -> int:
        local: int = 1  # a method's local, not a field
        return local


def test_field_comments_reads_trailing_comments_and_continuations():
    assert field_comments(Documented) == {
        "name": "the run's name",
        "lr": "learning rate, continued on the next line",
        "tags": "labels",
        "sec": "nested",
    }


def test_config_keys_dots_sections_with_the_defaults_the_config_gets():
    assert config_keys(Documented) == [
        KeyDoc("name", "str", None, "the run's name"),
        KeyDoc("lr", "float", "0.001", "learning rate, continued on the next line"),
        KeyDoc("tags", "list[str]", "[a, b]", "labels"),
        KeyDoc("limit", "int | None", "null", ""),
        KeyDoc("sec.on", "bool", "false", "turn the section on"),
        KeyDoc("sec.judge.url", "str", "http://localhost", "where the judge listens"),
        KeyDoc("sec.judge.timeout", "float", "5.0", "seconds per call"),
    ]


def test_describe_config_prints_key_type_default_and_description():
    text = describe_config(Documented)
    assert text.splitlines()[:4] == [
        "  name: str  (required)",
        "      the run's name",
        "  lr: float = 0.001",
        "      learning rate, continued on the next line",
    ]
    assert "  sec.judge.timeout: float = 5.0\n      seconds per call" in text


def test_a_given_key_of_a_section_keeps_the_default_sections_other_keys():
    cfg = build(Documented, {"name": "n", "sec": {"judge": {"timeout": 9}}})
    assert cfg.sec.judge.timeout == 9.0 and cfg.sec.judge.url == "http://localhost" and cfg.sec.on is False
    with pytest.raises(ConfigError, match="unknown key"):
        build(Documented, {"name": "n", "sec": {"judge": {"bogus": 1}}})
