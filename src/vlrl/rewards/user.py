"""Rewards of the user's own, named where a reward name is accepted (`rewards:` specs, ``vlrl score --reward``):

- ``path/to/file.py:function``: the function `function` of a Python file. A relative path is resolved against
  the current working directory when the spec is read (``RewardSpec`` creation, i.e. when the config is loaded),
  never against the config file's folder, as the config's other paths (model, data files, out) are.
  The absolute path is what the reward workers load, so a later change of directory does not matter.
- ``package.module:function``: imported as ``import package.module`` would (installed packages, PYTHONPATH).

A name with a ``:`` is a user reward; registered names never contain one. The function follows the reward
protocol of `vlrl.rewards.registry`: ``fn(completions, samples, **kwargs) -> list[float | None]``, called with
the two lists positionally, the spec's ``kwargs`` as keywords, and the trainer's runtime keywords
(``completion_lengths``) only when it declares them or takes ``**kwargs``.

Checked when the spec is read, each failure a `UserRewardError` naming the spec, the file (or module), the
function and what is wrong: the file is missing or not a ``.py`` file, the module cannot be imported, loading
raised (a syntax error with its line), there is no such function, the attribute is not callable (or is a class,
an ``async`` or generator function), or its signature cannot take ``(completions, samples, **spec kwargs)``.

Loading runs the file's top-level code with the trainer's rights, once per process that loads it: the trainer
when the config is read, and each reward worker on its first call. That is the point (VLM-R1, EasyR1 and verl
do the same); only the named file or module is executed, never text from data or model outputs.

Reward workers do not receive a pickled function (one from a file loaded under a made-up module name could not be
unpickled there): `UserReward` pickles as its target (absolute path or module name, and the function name) and
loads the function in whichever process calls it, so a user reward runs in the pool exactly as a built-in does.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SEPARATOR = ":"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

_MODULES: dict[str, types.ModuleType] = {}  # absolute file path -> module, per process
_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # UserTarget.resolved -> function, per process


class UserRewardError(ValueError):
    """A user reward that cannot be used; the message names the spec, the file or module and the function."""


def is_user_reward(name: str) -> bool:
    """True when `name` names a function in a file or module rather than a registered reward."""
    return SEPARATOR in name


@dataclass(frozen=True)
class UserTarget:
    """Where a user reward lives. spec: as written; location: the absolute file path (kind "file") or the dotted
    module name (kind "module"); function: the attribute name."""

    spec: str
    kind: Literal["file", "module"]
    location: str
    function: str

    @property
    def resolved(self) -> str:
        """``location:function``: the same function from any working directory."""
        return f"{self.location}{SEPARATOR}{self.function}"

    @property
    def where(self) -> str:
        return f"file {self.location}" if self.kind == "file" else f"module {self.location}"

    def fail(self, problem: str) -> UserRewardError:
        return UserRewardError(f"reward {self.spec!r}: {problem}")


def parse_target(spec: str, cwd: str | Path | None = None) -> UserTarget:
    """The target of ``path.py:function`` / ``package.module:function``; a relative path joins `cwd`
    (default: the current directory). Only the spelling is checked here, nothing is loaded."""
    location, _, function = spec.strip().rpartition(SEPARATOR)
    form = "write path/to/file.py:function or package.module:function"
    if not location or not function:
        raise UserRewardError(f"reward {spec!r}: {form}")
    if not function.isidentifier():
        raise UserRewardError(
            f"reward {spec!r}: the function name {function!r} is not a Python identifier ({form})"
        )
    if location.endswith(".py") or "/" in location or os.sep in location:
        if not location.endswith(".py"):
            raise UserRewardError(f"reward {spec!r}: {location!r} is not a .py file ({form})")
        try:
            path = Path(location).expanduser()
        except RuntimeError:  # ~user whose home directory cannot be determined
            raise UserRewardError(
                f"reward {spec!r}: cannot expand the home directory in {location!r}"
            ) from None
        if not path.is_absolute():
            path = Path(cwd if cwd is not None else os.getcwd()) / path
        return UserTarget(spec, "file", os.path.normpath(path), function)
    if not _MODULE_NAME.match(location):
        raise UserRewardError(
            f"reward {spec!r}: {location!r} is neither a .py file nor a dotted module name ({form})"
        )
    return UserTarget(spec, "module", location, function)


def _error_line(exc: BaseException, path: str) -> str:
    """`` (line N)`` of the deepest frame of `exc` inside `path`, or ""."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None and exc.filename == path:
        return f" (line {exc.lineno})"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f" (line {lines[-1]})" if lines else ""


def _load_file(target: UserTarget) -> types.ModuleType:
    path = target.location
    if path in _MODULES:
        return _MODULES[path]
    if not os.path.isfile(path):
        written = Path(target.spec.rpartition(SEPARATOR)[0].strip())
        hint = (
            ""
            if written.is_absolute() or target.spec.strip().startswith("~")
            else f" (a relative path is resolved against the current directory, {os.getcwd()})"
        )
        raise target.fail(f"file {path} not found{hint}")
    stem = re.sub(r"\W", "_", Path(path).stem)
    # a module name of its own per file, so two files called rewards.py never share one
    name = f"_vlrl_user_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise target.fail(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # registered before running it, as `import` does: dataclasses and pickling look the module up by name
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        del sys.modules[name]
        raise
    except BaseException as exc:  # SystemExit too: a reward file's top-level code must not end the trainer
        del sys.modules[name]
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise target.fail(
            f"loading {path} raised {type(exc).__name__}: {message}{_error_line(exc, path)}"
        ) from exc
    _MODULES[path] = module
    return module


def _import_module(target: UserTarget) -> types.ModuleType:
    try:
        return importlib.import_module(target.location)
    except Exception as exc:
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise target.fail(
            f"cannot import module {target.location}: {type(exc).__name__}: {message}{_origin(exc)}"
        ) from exc


def _origin(exc: BaseException) -> str:
    """`` (file, line N)`` where `exc` was raised outside importlib's machinery, or ""."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno is not None:
        return f" ({exc.filename}, line {exc.lineno})"
    machinery = (__file__, os.path.dirname(importlib.__file__), "<frozen")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(machinery)]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _functions_in(module: types.ModuleType) -> list[str]:
    return sorted(
        k
        for k, v in vars(module).items()
        if inspect.isfunction(v) and not k.startswith("_") and v.__module__ == module.__name__
    )


def load_function(target: UserTarget) -> Callable[..., Any]:
    """The function `target` names (loaded once per process), checked to be a plain callable; see the module doc."""
    cached = _FUNCTIONS.get(target.resolved)
    if cached is not None:
        return cached
    module = _load_file(target) if target.kind == "file" else _import_module(target)
    fn = getattr(module, target.function, None)
    if fn is None:
        defined = ", ".join(_functions_in(module)) or "none"
        raise target.fail(
            f"{target.where} has no function {target.function!r} (functions it defines: {defined})"
        )
    if not callable(fn):
        raise target.fail(f"{target.function!r} in {target.where} is not callable (type {type(fn).__name__})")
    if inspect.isclass(fn):
        raise target.fail(
            f"{target.function!r} in {target.where} is a class; name a function (or an instance "
            "with __call__) that returns the list of rewards"
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise target.fail(
            f"{target.function!r} in {target.where} is an async or generator function; the reward "
            "protocol calls it synchronously and needs the list of rewards returned"
        )
    _FUNCTIONS[target.resolved] = fn
    return fn


def check_call(
    target: UserTarget, fn: Callable[..., Any], kwargs: Mapping[str, Any], runtime: Iterable[str] = ()
) -> None:
    """Raise `UserRewardError` unless ``fn(completions, samples, **kwargs)`` binds to `fn`'s signature. A required
    parameter named in `runtime` (a keyword the trainer passes at run time) counts as given."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature (a C function): the first call tells
        return
    given = {k: None for k in runtime if k in sig.parameters and k not in kwargs}
    try:
        sig.bind(None, None, **dict(kwargs), **given)
    except TypeError as exc:
        call = ", ".join(["completions", "samples", *(f"{k}=..." for k in kwargs)])
        raise target.fail(
            f"{target.function}{sig} in {target.where} does not follow the reward protocol "
            f"fn(completions, samples, **kwargs): it cannot be called as {target.function}({call}): {exc}"
        ) from None


class UserReward:
    """A picklable stand-in for a user reward: calling it loads the target's function in the calling process (once)
    and calls it. It pickles as its `UserTarget`, so a reward worker loads the file or module itself."""

    def __init__(self, target: UserTarget) -> None:
        self.target = target
        self.__name__ = target.function
        self.__qualname__ = target.function

    def __call__(self, completions: list[str], samples: list[Any], **kwargs: Any) -> Any:
        return load_function(self.target)(completions, samples, **kwargs)

    def __repr__(self) -> str:
        return f"UserReward({self.target.resolved!r})"
