"""Imports run downward only: a module of `src/vlrl` imports from its own layer or below.

Layers, top to bottom: cli -> demo, curate, serve, report -> train -> eval -> rollout -> rewards, models -> data, algos,
config. Every `import vlrl.x` / `from vlrl.x import ...` counts, inside functions and `TYPE_CHECKING` blocks too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlrl

LAYERS = {
    "config": 0, "data": 0, "algos": 0,
    "rewards": 1, "models": 1,
    "rollout": 2,
    "eval": 3,
    "train": 4,
    "demo": 5, "curate": 5, "serve": 5, "report": 5,
    "cli": 6,
}  # fmt: skip
SRC = Path(vlrl.__file__).parent


def _part(module: str) -> str | None:
    """The top-level part of a `vlrl.*` module name (`vlrl.train.rl` -> `train`), None outside vlrl."""
    parts = module.split(".")
    return parts[1] if parts[0] == "vlrl" and len(parts) > 1 else None


def upward_imports(source: str, part: str) -> list[tuple[int, str]]:
    """(line, imported module) of each import in `source` (a module of `part`) that climbs a layer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            target = _part(name)
            if target is not None and LAYERS[target] > LAYERS[part]:
                found.append((node.lineno, name))
    return found


def test_the_checker_finds_an_upward_import() -> None:
    source = "import torch\nfrom vlrl.data.sample import Sample\n\ndef f():\n    from vlrl.train.rl import RLConfig\n"
    assert upward_imports(source, "rollout") == [(5, "vlrl.train.rl")]
    assert upward_imports(source, "curate") == []
    assert upward_imports("import vlrl.eval.evaluate\n", "models") == [(1, "vlrl.eval.evaluate")]


def test_every_layer_is_known() -> None:
    """Every top-level module and package has a layer; a folder without Python files (`recipes/`, package data)
    is not code and has none."""
    modules = {p.stem for p in SRC.glob("*.py")}
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    assert {m for m in modules | packages if not m.startswith("__")} == set(LAYERS)


def test_no_module_imports_from_a_layer_above_it() -> None:
    climbing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "__init__.py":
            continue
        part = rel.parts[0].removesuffix(".py")
        climbing += [f"{rel}:{line}: {name}" for line, name in upward_imports(path.read_text(), part)]
    assert climbing == [], "\n".join(climbing)
