"""The recipes ship as package data: every recipe the demo names is a file of `vlrl/recipes/`, each loads as a
YAML mapping, `pyproject.toml` declares them, and the checkout's `recipes/` is a link to the same files."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from vlrl import recipes_dir
from vlrl.demo import DemoConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGED = files("vlrl") / "recipes"


def _recipe_names() -> list[str]:
    return sorted(p.name for p in PACKAGED.iterdir() if p.name.endswith(".yaml"))


def test_every_recipe_the_demo_names_is_package_data() -> None:
    source = (files("vlrl") / "demo.py").read_text()
    named = set(re.findall(r"\"([\w.-]+\.yaml)\"", source))
    defaults = {getattr(DemoConfig(), f.name) for f in fields(DemoConfig) if f.name.endswith("_recipe")}
    demo_yaml = yaml.safe_load((PACKAGED / "demo.yaml").read_text())
    in_demo_yaml = {v for k, v in demo_yaml.items() if k.endswith("_recipe")}
    assert defaults <= named and "demo.yaml" in named and in_demo_yaml
    for name in sorted(named | in_demo_yaml):
        assert (PACKAGED / name).is_file(), f"{name} is not in vlrl/recipes"


@pytest.mark.parametrize("name", _recipe_names())
def test_each_recipe_is_a_yaml_mapping(name: str) -> None:
    assert isinstance(yaml.safe_load((PACKAGED / name).read_text()), dict)


def test_recipes_dir_and_the_checkout_link_are_the_packaged_files() -> None:
    names = _recipe_names()
    assert len(names) >= 4
    assert recipes_dir() == Path(str(PACKAGED))
    assert sorted(p.name for p in recipes_dir().glob("*.yaml")) == names
    root = REPO / "recipes"
    assert root.is_symlink() and os.readlink(root) == os.path.join("src", "vlrl", "recipes")  # relative link
    assert root.resolve() == recipes_dir().resolve()
    assert sorted(p.name for p in root.glob("*.yaml")) == names
    for name in names:
        assert (root / name).read_bytes() == (PACKAGED / name).read_bytes()


def test_pyproject_declares_the_recipes_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["vlrl"]
    for name in _recipe_names():
        assert any(fnmatch(f"recipes/{name}", p) for p in patterns), f"recipes/{name} is not package data"


def _config_class(recipe: dict) -> type:
    """The config a recipe is for: RL recipes have a `rollout` section, SFT recipes a `stage`, the demo's `tasks`."""
    from vlrl.train.rl_config import RLConfig
    from vlrl.train.sft import SFTConfig

    if "rollout" in recipe:
        return RLConfig
    if "stage" in recipe:
        return SFTConfig
    assert "tasks" in recipe, "a recipe for no known command"
    return DemoConfig


@pytest.mark.parametrize("name", _recipe_names())
def test_each_recipe_loads_into_its_config(name: str) -> None:
    """Every key of every recipe is a key of its command's config (the RL recipes in their sections), and the RL
    recipes pass the run's own checks of names and values."""
    from vlrl.config import load_config
    from vlrl.train.rl_config import RLConfig, check_config

    cls = _config_class(yaml.safe_load((PACKAGED / name).read_text()))
    cfg = load_config(cls, Path(str(PACKAGED / name)))
    if cls is RLConfig:
        check_config(cfg)
        assert cfg.rollout.group_size > 1 and cfg.rewards
