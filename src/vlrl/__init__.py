"""vlrl: teach vision-language models to reason with reinforcement learning."""

from importlib.resources import files
from pathlib import Path

__version__ = "0.1.0"


def recipes_dir() -> Path:
    """The folder of the YAML recipes shipped inside the package (package data `vlrl/recipes/*.yaml`; a checkout
    links it as `recipes/`). pip installs vlrl as files on disk (wheels are unpacked), so this is a directory."""
    return Path(str(files("vlrl") / "recipes"))
