"""Registry: registration, lookup, and the error that lists valid names."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vlrl.algos import ADVANTAGES, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES, Registry, UnknownNameError


def test_register_get_names() -> None:
    reg: Registry[Callable[[], int]] = Registry("widget")

    @reg.register("b")
    def b() -> int:
        return 2

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.get("a")() == 1 and reg.get("b") is b
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_unknown_name_lists_valid_names_and_is_key_and_value_error() -> None:
    reg: Registry[Callable[[], int]] = Registry("widget")
    reg.register("alpha")(lambda: 1)
    reg.register("beta")(lambda: 2)
    with pytest.raises(KeyError) as exc:
        reg.get("gamma")
    assert str(exc.value) == "unknown widget 'gamma'; valid names: 'alpha', 'beta'"
    with pytest.raises(ValueError, match="valid names: 'alpha', 'beta'"):
        reg.get("gamma")
    assert isinstance(exc.value, UnknownNameError)


def test_duplicate_registration_is_an_error() -> None:
    reg: Registry[Callable[[], int]] = Registry("widget")
    reg.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: 2)


def test_builtin_registries_hold_the_algorithms() -> None:
    assert ADVANTAGES.names() == ["dr_grpo", "grpo", "reinforce_pp", "rloo"]
    assert POLICY_LOSSES.names() == ["gspo", "gspo_token", "ppo_clip"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert AGG_MODES.names() == [
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]
