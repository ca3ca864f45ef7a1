from dataclasses import dataclass, field

import pytest

from vlrl.config import ConfigError, load_config, save_config


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
