"""Fuzzing config loading: YAML config files and `key=value` overrides, for each command's config class.

Property: a config of the class or a `ConfigError` (never another exception), within the time and memory bounds
of `limits`, and nothing imported (a YAML tag or a reward name never loads code).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzing import fuzz_settings, limits
from hypothesis import example, given
from hypothesis import strategies as st

from vlrl.config import ConfigError, config_keys, load_config, parse_overrides
from vlrl.curate.run import CurateConfig
from vlrl.eval.evaluate import EvalConfig
from vlrl.train.rl_config import RLConfig
from vlrl.train.sft import SFTConfig

CLASSES = [SFTConfig, RLConfig, EvalConfig, CurateConfig]
KEYS = sorted({k.key for cls in CLASSES for k in config_keys(cls)})
# values that sit on the edges of the configs' ranges, and YAML that is hostile
EDGES = ["0", "-1", "-5", "1", "2", "0.5", "1.5", "1e-3", "2e-3", "nan", ".nan", ".inf", "-.inf", "1e999", "null", "~",
         "true", "[]", "[a, b]", "{}", "{name: accuracy}", "[{name: accuracy}]", "[{name: bogus}]", "hf", "vllm", "grpo",
         "gspo", "token", "full", "answer", "''", "'0,0.6'", "[0.6, 0.1]", "&a [1]", "*a", "[&a 1, *a]",
         "!!python/object/apply:os.system [echo]", "[[[[[[[[1]]]]]]]]", "9" * 40, "x:y", "os:system"]
TOKENS = ["model", "data", "out", "lr", "rollout", "algorithm", "advantage_kwargs", "trust", "judge", ":", ": ", " ",
          "  ", "\n", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!python/object:os.system ", "!!binary ", "'", '"',
          "#", "? ", "|", ">", "1e3", ".nan", "~", "\t", "\ud800", "%YAML 1.1\n", "---\n", "...\n", "<<: ", "=", "."]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=16)
keys = st.sampled_from(KEYS) | st.text(max_size=12)
value_texts = st.sampled_from(EDGES) | st.text(max_size=20) | values.map(lambda v: yaml.safe_dump(v).strip())
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, value_texts), max_size=6)


def _tree(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Dotted keys and values as the nested mapping a config file writes; a clash keeps the first."""
    tree: dict[str, Any] = {}
    for key, value in pairs:
        *sections, last = key.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {}) if isinstance(node.get(s, {}), dict) else {}
        node.setdefault(last, value)
    return tree


config_docs = st.lists(st.tuples(keys, values), max_size=8).map(lambda p: yaml.safe_dump(_tree(p)))
yaml_texts = config_docs | st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=30).map("".join)

BOMB = "model: m\ndata: [d]\nout: o\nalgorithm:\n  advantage_kwargs:\n    a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@pytest.fixture(scope="module")
def warm() -> None:
    """Build each class once, so that the imports a first build makes are not counted against a case."""
    for cls in CLASSES:
        with pytest.raises(ConfigError):
            load_config(cls, None, ["model=m", "data=[d]", "out=o", "seed=-1"])


def _load(cls: type, path: Path | None, items: list[str]) -> None:
    """The property: a config of `cls` or a ConfigError, and no module imported by the attempt."""
    before = set(sys.modules)
    try:
        cfg = load_config(cls, path, items)
    except ConfigError:
        pass
    else:
        assert isinstance(cfg, cls)
    assert set(sys.modules) == before, sorted(set(sys.modules) - before)


@fuzz_settings(examples=75)
@given(items=overrides, cls=st.sampled_from(CLASSES), base=st.booleans())
def test_overrides_give_a_config_or_a_config_error(warm: None, items: list[str], cls: type, base: bool) -> None:
    given_ = ["model=m", "data=[d]", "out=fuzz-out/never-made"] if base else []
    with limits("config.load_config(overrides)", seconds=20, megabytes=64):
        _load(cls, None, given_ + items)


@fuzz_settings(examples=75)
@given(text=yaml_texts, cls=st.sampled_from(CLASSES))
@example(text=BOMB, cls=RLConfig)
@example(text="[" * 5000 + "]" * 5000, cls=SFTConfig)
@example(text="lr: !!python/object/apply:os.system [echo pwned]\n", cls=SFTConfig)
def test_yaml_files_give_a_config_or_a_config_error(warm: None, tmp_path_factory: pytest.TempPathFactory,
                                                    text: str, cls: type) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with limits("config.load_config(yaml)", seconds=20, megabytes=64):
        _load(cls, path, [])


@fuzz_settings(examples=100)
@given(items=st.lists(st.text(max_size=30) | overrides.map(lambda x: x[0] if x else ""), max_size=5))
def test_parse_overrides_gives_a_tree_or_a_config_error(items: list[str]) -> None:
    with limits("config.parse_overrides"):
        try:
            tree = parse_overrides(items)
        except ConfigError:
            return
        assert isinstance(tree, dict)
