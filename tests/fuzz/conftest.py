"""Each fuzz test's cases per target travel on its report (`user_properties`), so that tests/conftest.py can print
the totals whether the tests ran in this process or in pytest-xdist workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from fuzzing import COUNTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    before = Counter(COUNTS)
    yield
    ran = {target: n - before[target] for target, n in COUNTS.items() if n > before[target]}
    if ran:
        item.user_properties.append(("fuzz_cases", ran))
