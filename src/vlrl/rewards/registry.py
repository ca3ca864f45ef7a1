"""Reward registry and the weighted combination of several rewards.

Protocol: a reward is ``fn(completions: list[str], samples: list[Sample], **kwargs)
-> list[float | None]``, one value per completion, ``completions[i]`` answering ``samples[i]``; None means
"could not score" (counted, never a crash). Configuration keywords are keyword parameters of ``fn``;
runtime keywords that the trainer passes to every reward (e.g. ``completion_lengths``) reach only the
rewards that declare them (or that take ``**kwargs``).

A reward name with a ``:`` is a reward of the user's own, ``path/to/file.py:function`` or
``package.module:function`` (`vlrl.rewards.user`): loaded and checked against the protocol when its `RewardSpec`
is made, run by the same `RewardRunner` with the same time limit and None handling as a registered one. Its
default key is the function's name; its spec's kwargs must be parameters of the function (any, if it takes
``**kwargs``).

`combine(specs, completions, samples)` returns ``(total, per_reward, metrics)``:

- ``total[i] = sum_k weight_k * value_k[i]`` with a None value counting as 0;
- ``per_reward[key]`` the raw values of each reward (key = the spec's label, default its name, or for a user
  reward its function's name; two specs with one key are an error);
- metrics per reward ``reward/{key}/mean`` (mean of the non-None values, 0.0 when there is none),
  ``reward/{key}/none`` (number of None values), ``reward/{key}/errors`` and ``reward/{key}/timeouts``
  (items that ended None because the reward raised / exceeded the runner's time limit), and
  ``reward/total/mean``, ``reward/total/std`` (population std).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlrl.rewards.user import UserReward, check_call, is_user_reward, load_function, parse_target

if TYPE_CHECKING:
    from vlrl.data.sample import Sample
    from vlrl.rewards.runner import RewardRunner

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]

# keywords the trainer passes to every reward that declares them (see the module doc)
RUNTIME_KEYWORDS = ("completion_lengths",)


@dataclass(frozen=True)
class RewardInfo:
    """A registered (or user) reward: its function, documented value range and how the runner may call it.

    cheap: linear-time string checks that the runner may call in-process (its fast path).
    chunkable: values depend on one completion at a time, so the batch may be split into chunks.
    params: the configuration keywords a `RewardSpec` may set (others are an error).
    var_keyword: the function takes ``**kwargs`` (so it receives every runtime keyword).
    source: for a user reward, the function it names as ``/absolute/path.py:function`` or ``module:function``
        (`fn` is then a picklable `UserReward`); None for a registered reward.
    """

    name: str
    fn: RewardFn
    value_range: tuple[float, float]
    cheap: bool
    chunkable: bool
    params: frozenset[str]
    var_keyword: bool
    source: str | None = None

    @property
    def default_key(self) -> str:
        """The metric key of a spec without a label: the registered name, or a user reward's function name."""
        return self.name.rpartition(":")[2] if self.source is not None else self.name


_REGISTRY: dict[str, RewardInfo] = {}


def _keyword_params(fn: RewardFn) -> tuple[frozenset[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature: assume it takes what it is given
        return frozenset(), True
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

    if is_user_reward(name):
        raise ValueError(
            f"reward name {name!r}: a ':' is reserved for path.py:function / module:function rewards"
        )

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
    """The record of `name`: a registered reward (unknown names raise KeyError listing the valid ones), or a
    ``path.py:function`` / ``module:function`` reward, loaded and checked (`UserRewardError`, a ValueError)."""
    if is_user_reward(name):
        return user_reward_info(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward {name!r}; valid: {', '.join(list_rewards())}; or a reward of your own "
            "as path/to/file.py:function or package.module:function"
        ) from None


_USER: dict[str, RewardInfo] = {}  # UserTarget.resolved -> record, per process


def user_reward_info(spec: str) -> RewardInfo:
    """The record of user reward `spec` (a relative path resolved against the current directory), its function
    loaded once per process; `RewardSpec` checks the signature against the spec's kwargs. Range: (-inf, inf)."""
    target = parse_target(spec)
    known = _USER.get(target.resolved)
    if known is not None:
        return dataclasses.replace(known, name=spec)
    fn = load_function(target)
    params, var_kw = _keyword_params(fn)
    # never `cheap`: arbitrary code goes to the worker pool and its time limit whenever there is one
    info = RewardInfo(
        spec, UserReward(target), (-math.inf, math.inf), False, True, params, var_kw, target.resolved
    )
    _USER[target.resolved] = info
    return info


def _check_kwargs(name: str, info: RewardInfo, kwargs: dict[str, Any]) -> None:
    if isinstance(info.fn, UserReward):  # the function's own signature decides, **kwargs included
        target = info.fn.target
        check_call(target, load_function(target), kwargs, RUNTIME_KEYWORDS)
        return
    unknown = sorted(set(kwargs) - info.params)
    if unknown:
        valid = ", ".join(sorted(info.params)) or "(none)"
        raise ValueError(f"reward {name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}")


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`; unknown names raise KeyError listing the valid ones."""
    return reward_info(name).fn


@dataclass
class RewardSpec:
    """One weighted reward of a run: `name` in the registry or ``path.py:function`` / ``module:function``, its
    `weight`, configuration `kwargs`, and an optional `label` (the metric key; default: the registered name, or
    the user function's name) to tell apart two specs of the same reward or two functions of the same name."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        info = reward_info(self.name)
        _check_kwargs(self.name, info, self.kwargs)
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward {self.name!r}: weight must be finite, got {self.weight!r}")
        # kept (not a dataclass field, so not in the saved config): a user reward's path was resolved against the
        # directory current now, and later look-ups must not depend on where the process has moved since
        self._info = info

    @property
    def info(self) -> RewardInfo:
        """The record this spec was checked against when made."""
        info = self.__dict__.get("_info")
        return info if isinstance(info, RewardInfo) else reward_info(self.name)

    @property
    def key(self) -> str:
        """The metric key, ``reward/<key>``: the label, else the registered name or the user function's name."""
        return self.label or self.info.default_key


def check_reward_keys(specs: Sequence[RewardSpec]) -> None:
    """Raise ValueError when two specs share a key (their metrics and per-reward values would collide)."""
    seen: dict[str, RewardSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.key, spec)
        if other is not spec:
            hint = (
                "; a path.py:function or module:function reward's key defaults to the function's name"
                if spec.info.source is not None or other.info.source is not None
                else ""
            )
            raise ValueError(
                f"duplicate reward key {spec.key!r} ({other.name} and {spec.name}): give repeated "
                f"rewards distinct labels (label: ...){hint}"
            )


def specs_or_names(specs: list[RewardSpec], names: list[str]) -> list[RewardSpec]:
    """A config's rewards: `names` (the `reward:` shorthand, weight 1 each) when given, else `specs`; at least one."""
    chosen = [RewardSpec(name) for name in names] if names else list(specs)
    if not chosen:
        raise ValueError("rewards: name at least one reward")
    check_reward_keys(chosen)
    return chosen


def _call_kwargs(info: RewardInfo, spec_kwargs: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    picked = {k: v for k, v in runtime.items() if info.var_keyword or k in info.params}
    picked.update(spec_kwargs)
    return picked


_WARNED: set[str] = set()


def _warn_in_process(spec: RewardSpec) -> None:
    if spec.name in _WARNED:
        return
    _WARNED.add(spec.name)
    logger.warning(
        "reward %r runs in-process, where no time limit applies: a call that never returns stalls this command; "
        "with reward workers (rollout.reward_workers in rl, --workers in vlrl score) it runs under their time "
        "limit",
        spec.name,
    )


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

    check_reward_keys(specs)
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    owned = runner is None
    active = runner if runner is not None else RewardRunner(workers=0)
    total = [0.0] * len(completions)
    per_reward: dict[str, list[float | None]] = {}
    metrics: dict[str, float] = {}
    try:
        for spec in specs:
            info = spec.info
            if info.source is not None and active.workers == 0:
                _warn_in_process(spec)
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
