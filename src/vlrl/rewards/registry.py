"""Reward registry and the weighted combination of several rewards.

Protocol: a reward is ``fn(completions: list[str], samples: list[Sample], **kwargs)
-> list[float | None]``, one value per completion, ``completions[i]`` answering ``samples[i]``; None means
"could not score" (counted, never a crash). Configuration keywords are keyword parameters of ``fn``;
runtime keywords that the trainer passes to every reward (e.g. ``completion_lengths``) reach only the
rewards that declare them (or that take ``**kwargs``).

`combine(specs, completions, samples)` returns ``(total, per_reward, metrics)``:

- ``total[i] = sum_k weight_k * value_k[i]`` with a None value counting as 0;
- ``per_reward[key]`` the raw values of each reward (key = the spec's label, default its name);
- metrics per reward ``reward/{key}/mean`` (mean of the non-None values, 0.0 when there is none),
  ``reward/{key}/none`` (number of None values), ``reward/{key}/errors`` and ``reward/{key}/timeouts``
  (items that ended None because the reward raised / exceeded the runner's time limit), and
  ``reward/total/mean``, ``reward/total/std`` (population std).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlrl.data.sample import Sample
    from vlrl.rewards.runner import RewardRunner

RewardFn = Callable[..., list[float | None]]


@dataclass(frozen=True)
class RewardInfo:
    """A registered reward: its function, documented value range and how the runner may call it.

    cheap: linear-time string checks that the runner may call in-process (its fast path).
    chunkable: values depend on one completion at a time, so the batch may be split into chunks.
    params: the configuration keywords a `RewardSpec` may set (others are an error).
    var_keyword: the function takes ``**kwargs`` (so it receives every runtime keyword).
    """

    name: str
    fn: RewardFn
    value_range: tuple[float, float]
    cheap: bool
    chunkable: bool
    params: frozenset[str]
    var_keyword: bool


_REGISTRY: dict[str, RewardInfo] = {}


def _keyword_params(fn: RewardFn) -> tuple[frozenset[str], bool]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params[2:] if p.kind in kinds]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return frozenset(names), var_kw


def register_reward(
    name: str,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    cheap: bool = False,
    chunkable: bool = True,
    params: Iterable[str] | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn` under `name`. Re-registering the same function is a no-op.

    `params` declares the configuration keywords of a reward that takes them as ``**kwargs``; by default
    they are the keyword parameters of its signature after (completions, samples). `RewardSpec` rejects
    any other key.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"reward {name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}"
            )
        names, var_kw = _keyword_params(fn)
        declared = frozenset(params) if params is not None else names
        _REGISTRY[name] = RewardInfo(name, fn, value_range, cheap, chunkable, declared, var_kw)
        return fn

    return decorator


def list_rewards() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def reward_info(name: str) -> RewardInfo:
    """The registration record of `name`; unknown names raise KeyError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid: {', '.join(list_rewards())}") from None


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`; unknown names raise KeyError listing the valid ones."""
    return reward_info(name).fn


@dataclass
class RewardSpec:
    """One weighted reward of a run: `name` in the registry, its `weight`, configuration `kwargs`,
    and an optional `label` to tell apart two specs of the same reward (default: the name)."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        info = reward_info(self.name)
        unknown = sorted(set(self.kwargs) - info.params)
        if unknown:
            valid = ", ".join(sorted(info.params)) or "(none)"
            raise ValueError(f"reward {self.name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward {self.name!r}: weight must be finite, got {self.weight!r}")

    @property
    def key(self) -> str:
        return self.label or self.name


def specs_or_names(specs: list[RewardSpec], names: list[str]) -> list[RewardSpec]:
    """A config's rewards: `names` (the `reward:` shorthand, weight 1 each) when given, else `specs`; at least one."""
    chosen = [RewardSpec(name) for name in names] if names else list(specs)
    if not chosen:
        raise ValueError("rewards: name at least one reward")
    return chosen


def _call_kwargs(info: RewardInfo, spec_kwargs: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    picked = {k: v for k, v in runtime.items() if info.var_keyword or k in info.params}
    picked.update(spec_kwargs)
    return picked


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def combine(
    specs: Sequence[RewardSpec],
    completions: list[str],
    samples: list[Sample],
    *,
    runner: RewardRunner | None = None,
    **runtime_kwargs: Any,
) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
    """Weighted sum of several rewards; see the module doc for the returned metrics."""
    from vlrl.rewards.runner import RewardRunner

    keys = [spec.key for spec in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate reward keys {keys}; give repeated rewards distinct labels")
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    owned = runner is None
    active = runner if runner is not None else RewardRunner(workers=0)
    total = [0.0] * len(completions)
    per_reward: dict[str, list[float | None]] = {}
    metrics: dict[str, float] = {}
    try:
        for spec in specs:
            info = reward_info(spec.name)
            kwargs = _call_kwargs(info, spec.kwargs, runtime_kwargs)
            result = active.run(
                info.fn,
                completions,
                samples,
                kwargs,
                name=spec.key,
                cheap=info.cheap,
                chunkable=info.chunkable,
            )
            per_reward[spec.key] = result.values
            scored = [v for v in result.values if v is not None]
            for i, value in enumerate(result.values):
                if value is not None:
                    total[i] += spec.weight * value
            metrics[f"reward/{spec.key}/mean"] = _mean(scored)
            metrics[f"reward/{spec.key}/none"] = float(len(result.values) - len(scored))
            metrics[f"reward/{spec.key}/errors"] = float(result.errors)
            metrics[f"reward/{spec.key}/timeouts"] = float(result.timeouts)
    finally:
        if owned:
            active.close()
    mean = _mean(total)
    metrics["reward/total/mean"] = mean
    metrics["reward/total/std"] = math.sqrt(_mean([(t - mean) ** 2 for t in total])) if total else 0.0
    return total, per_reward, metrics
