"""A tiny name -> function registry shared by every algorithm family in `vlrl.algos`.

Algorithms are registered pure functions looked up by the name a config gives (after verl's `core_algos`
registries). An unknown name raises `UnknownNameError`, which is both a `KeyError`
and a `ValueError` and whose message lists every valid name, so a typo in a recipe fails loudly and helpfully.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import Tensor

# Every algorithm returns `(value, metrics)`; metrics are plain Python floats so the train loop can write them
# straight into metrics.jsonl.
Metrics = dict[str, float]

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """Raised by `Registry.get` for a name that was never registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message (extra quotes); show it plainly instead.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[F]):
    """Maps names to functions of one kind ("advantage estimator", "policy loss", ...).

    Example:
        >>> LOSSES: Registry[Callable[..., float]] = Registry("policy loss")
        >>> @LOSSES.register("zero")
        ... def zero() -> float:
        ...     return 0.0
        >>> LOSSES.get("zero")()
        0.0
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering the function under `name`; a duplicate name is an error."""

        def decorator(fn: F) -> F:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered as `name`; raises `UnknownNameError` listing the valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(repr(n) for n in self.names())
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


# Signatures (keyword scalars vary per function and are documented on each one):
#   advantage estimator: fn(rewards [B*G], group_size, **scalars) -> (advantages [B*G], metrics)
#   policy loss:         fn(logp [N, T], old_logp [N, T], advantages [N] | [N, T], mask [N, T], **scalars)
#                        -> (loss_mat [N, T], metrics)
#   KL estimator:        fn(logp [N, T], ref_logp [N, T]) -> kl [N, T]   (an elementwise map, no metrics)
#   aggregation mode:    fn(loss_mat [N, T], mask [N, T], max_len, num_tokens) -> scalar
AdvantageFn = Callable[..., tuple[Tensor, Metrics]]
PolicyLossFn = Callable[..., tuple[Tensor, Metrics]]
KLEstimatorFn = Callable[[Tensor, Tensor], Tensor]
AggFn = Callable[[Tensor, Tensor, float | None, float | None], Tensor]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
KL_ESTIMATORS: Registry[KLEstimatorFn] = Registry("KL estimator")
AGG_MODES: Registry[AggFn] = Registry("loss aggregation mode")
