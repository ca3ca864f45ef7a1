"""Shared fixtures: the built-in tiny model and small synthetic splits, built once per session."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import jitter_text_weights

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `make test` runs two pytest-xdist workers on the 2 cores: one intra-op thread each, so they do not contend
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else 2)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test (faster for the tiny model when the 2 cores are shared); restored after.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlrl.models.build import init_model

    return init_model("qwen2-vl", "tiny", tmp_path_factory.mktemp("models") / "tiny-qwen2-vl", seed=0)


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with `jitter_text_weights`, saved as a model folder."""
    from vlrl.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir)
    out = tmp_path_factory.mktemp("models") / "tiny-varied"
    jitter_text_weights(model).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlrl.data.synth import write_split

    out = tmp_path_factory.mktemp("synth")
    for task in ("counting", "chart", "compare", "grounding"):
        write_split(task, 48, seed=1, out_dir=out, split="train")
        write_split(task, 16, seed=2, out_dir=out, split="test")
    return out


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (../shared/data is beside the repo in CI)")
    return path


@pytest.fixture
def mathv_dir() -> Path:
    return _shared("mathv-testmini")


@pytest.fixture
def nlvr_dir() -> Path:
    return _shared("nlvr-dev150")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fuzz cases run per target (`make test` and `make fuzz`), summed from the tests' reports
    (tests/fuzz/conftest.py puts them there, in this process or in a pytest-xdist worker)."""
    tr = terminalreporter
    counts: Counter[str] = Counter()
    for reports in tr.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                for name, value in getattr(report, "user_properties", ()):
                    if name == "fuzz_cases":
                        counts.update(value)
    if not counts:
        return
    tr.section("fuzz cases" + (" (campaign)" if "VLRL_FUZZ_SCALE" in os.environ else ""))
    for target, n in sorted(counts.items()):
        tr.write_line(f"{target:<48} {n:>9,}")
    failed = len(tr.stats.get("failed", []))
    tr.write_line(f"{'total':<48} {sum(counts.values()):>9,}   targets {len(counts)}   failed tests {failed}")
