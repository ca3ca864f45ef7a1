"""Fixtures of the serve tests: one `vlrl serve` of the tiny model for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import Served, start_server


@pytest.fixture(scope="session")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield server
    server.stop()
