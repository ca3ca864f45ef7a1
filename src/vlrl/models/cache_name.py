"""The name of a forward's key/value cache in transformers: `past_key_values` up to 5.23, `cache` from 5.24
(the old name still works there with a deprecation warning, until its removal in 5.40). vlrl supports
transformers >= 5.23, so the name is chosen once from the installed version.

    out = model(input_ids=ids, **cache_arg(cache), use_cache=True)
    cache = cache_of(out)
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from packaging.version import Version

CACHE_ARG = "cache" if Version(version("transformers")) >= Version("5.24.0.dev0") else "past_key_values"


def cache_arg(cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to a model's forward."""
    return {CACHE_ARG: cache}


def cache_of(output: Any) -> Any:
    """The key/value cache a model's forward returned."""
    return getattr(output, CACHE_ARG)
