"""Rewards of the user's own (`path.py:function`, `package.module:function`): loading, the config-time errors,
keys and labels, the worker pool loading them by name, and the None handling of a reward that misbehaves."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlrl.config import ConfigError, build, load_config
from vlrl.data.sample import Sample
from vlrl.rewards.registry import RewardSpec, combine, specs_or_names
from vlrl.rewards.runner import RewardRunner
from vlrl.rewards.user import UserReward, UserRewardError

TIMEOUT = 1.5

GOOD = '''
import os

def length_bonus(completions, samples, *, scale=1.0, completion_lengths=None):
    """scale x the completion's character count; the token count when the trainer passes one."""
    if completion_lengths is not None:
        return [scale * n for n in completion_lengths]
    return [scale * len(c) for c in completions]

def pid(completions, samples, **kwargs):
    return [float(os.getpid())] * len(completions)

def answer_is_gold(completions, samples):
    return [1.0 if c == s.answer else 0.0 for c, s in zip(completions, samples)]
'''

# one reward that misbehaves in the way each completion asks, and otherwise scores 1.0
HOSTILE = """
import time

def hostile(completions, samples):
    out = []
    for c in completions:
        if c == "raise":
            raise RuntimeError("boom")
        if c == "hang":
            time.sleep(60)
        if c == "length":
            return [1.0] * (len(completions) + 1)
        out.append({"nan": float("nan"), "text": "high", "none": None}.get(c, 1.0))
    return out
"""


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def _samples(n: int, answer: str = "3") -> list[Sample]:
    return [
        Sample(id=str(i), images=[], messages=[], answer=answer, problem_type="numerical") for i in range(n)
    ]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory, holding rewards/good.py and rewards/hostile.py."""
    _write(tmp_path / "rewards" / "good.py", GOOD)
    _write(tmp_path / "rewards" / "hostile.py", HOSTILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------- loading


def test_file_reward_by_relative_path_resolved_against_the_current_directory(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = RewardSpec("rewards/good.py:length_bonus", 2.0, {"scale": 0.5})
    assert spec.key == "length_bonus"  # the function's name
    assert spec.info.source == f"{in_tmp / 'rewards' / 'good.py'}:length_bonus"
    monkeypatch.chdir(in_tmp / "rewards")  # resolved when the spec was made: moving later changes nothing
    total, per_reward, metrics = combine([spec], ["ab", "abcd"], _samples(2))
    assert per_reward == {"length_bonus": [1.0, 2.0]} and total == [2.0, 4.0]
    assert metrics["reward/length_bonus/mean"] == 1.5
    # runtime keywords reach a function that declares them
    _, per_reward, _ = combine([spec], ["ab", "abcd"], _samples(2), completion_lengths=[10, 20])
    assert per_reward["length_bonus"] == [5.0, 10.0]
    # from the new directory the same relative name does not resolve, and the error says against what
    with pytest.raises(UserRewardError, match=r"not found \(a relative path is resolved against the current"):
        RewardSpec("rewards/good.py:length_bonus")
    absolute = RewardSpec(f"{in_tmp / 'rewards' / 'good.py'}:answer_is_gold")
    assert combine([absolute], ["3", "4"], _samples(2))[1]["answer_is_gold"] == [1.0, 0.0]


def test_relative_path_is_not_resolved_against_the_config_file(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one rule: the current directory. A config in configs/ naming `good.py:...` that sits beside it
    fails from the repository root, and `rewards/good.py:...` (relative to the root) works."""

    @dataclass
    class Cfg:
        rewards: list[RewardSpec] = field(default_factory=list)

    (in_tmp / "configs").mkdir()
    _write(in_tmp / "configs" / "good.py", GOOD)
    beside = _write(in_tmp / "configs" / "beside.yaml", "rewards: [{name: good.py:answer_is_gold}]\n")
    expected = f"{beside}.rewards[0]: reward 'good.py:answer_is_gold': file {in_tmp / 'good.py'} not found"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(Cfg, beside)
    root = _write(in_tmp / "configs" / "root.yaml", "rewards: [{name: rewards/good.py:answer_is_gold}]\n")
    assert load_config(Cfg, root).rewards[0].info.source == f"{in_tmp / 'rewards' / 'good.py'}:answer_is_gold"
    monkeypatch.chdir(in_tmp / "configs")
    assert load_config(Cfg, beside).rewards[0].key == "answer_is_gold"


def test_module_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "mypkg" / "__init__.py", "")
    _write(tmp_path / "mypkg" / "scoring.py", GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = RewardSpec("mypkg.scoring:answer_is_gold", label="gold")
    assert spec.key == "gold" and spec.info.source == "mypkg.scoring:answer_is_gold"
    assert combine([spec], ["3", "x"], _samples(2))[1] == {"gold": [1.0, 0.0]}
    # a function taking **kwargs accepts any spec kwarg
    builtin = RewardSpec("vlrl.rewards.accuracy:accuracy_reward", kwargs={"rel_tol": 0.5})
    assert combine([builtin], ["<answer>4</answer>"], _samples(1))[1] == {"accuracy_reward": [1.0]}


def test_the_handle_pickles_as_its_name_not_as_code(in_tmp: Path) -> None:
    fn = RewardSpec("rewards/good.py:pid").info.fn
    assert isinstance(fn, UserReward)
    data = pickle.dumps(fn)
    assert b"good.py" in data and b"getpid" not in data
    again = pickle.loads(data)
    assert again.target == fn.target and again(["a"], _samples(1)) == [float(os.getpid())]


# -------------------------------------------------------------------------------------------------- errors

_TMP = "{tmp}/rewards"
ERRORS = {  # case: (spec, spec kwargs, the message it must give, {tmp} the current directory)
    "missing file": ("rewards/nope.py:f", {}, rf"file {_TMP}/nope.py not found"),
    "not a .py file": ("rewards/good.txt:f", {}, r"'rewards/good.txt' is not a .py file"),
    "bad function name": ("rewards/good.py:1st", {}, r"the function name '1st' is not a Python identifier"),
    "no function name": (
        "rewards/good.py:",
        {},
        r"write path/to/file.py:function or package.module:function",
    ),
    "syntax error": (
        "rewards/syntax.py:f",
        {},
        rf"loading {_TMP}/syntax.py raised SyntaxError: .* \(line 2\)",
    ),
    "raises on load": ("rewards/raising.py:f", {}, r"raised ImportError: no scipy here \(line 2\)"),
    "exits on load": ("rewards/exits.py:f", {}, r"raised SystemExit"),
    "no such function": (
        "rewards/good.py:lenght_bonus",
        {},
        rf"file {_TMP}/good.py has no function 'lenght_bonus' "
        r"\(functions it defines: answer_is_gold, length_bonus, pid\)",
    ),
    "not callable": (
        "rewards/shapes.py:THRESHOLD",
        {},
        r"'THRESHOLD' in file .* is not callable \(type float\)",
    ),
    "a class": ("rewards/shapes.py:Scorer", {}, r"'Scorer' in file .* is a class"),
    "async": ("rewards/shapes.py:remote", {}, r"'remote' in file .* is an async or generator function"),
    "one parameter": (
        "rewards/shapes.py:one",
        {},
        rf"one\(completions\) in file {_TMP}/shapes.py does not follow the reward protocol "
        r"fn\(completions, samples, \*\*kwargs\).*too many positional arguments",
    ),
    "required keyword": (
        "rewards/shapes.py:needs_target",
        {},
        r"needs_target\(completions, samples, \*, target\).*missing a required argument: 'target'",
    ),
    "unknown kwarg": (
        "rewards/good.py:length_bonus",
        {"scael": 2},
        r"cannot be called as length_bonus\(completions, samples, scael=...\).*unexpected keyword argument 'scael'",
    ),
    "no module": (
        "no_such_pkg.rewards:f",
        {},
        r"cannot import module no_such_pkg.rewards: ModuleNotFoundError",
    ),
    "not a module name": ("my rewards:f", {}, r"'my rewards' is neither a .py file nor a dotted module name"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_config_time_errors_name_the_file_the_function_and_the_problem(in_tmp: Path, case: str) -> None:
    _write(in_tmp / "rewards" / "syntax.py", "def f(completions, samples):\n    x = [1.0\n    return x\n")
    _write(in_tmp / "rewards" / "raising.py", "import os\nraise ImportError('no scipy here')\n")
    _write(in_tmp / "rewards" / "exits.py", "import sys\nsys.exit(3)\n")
    _write(in_tmp / "rewards" / "shapes.py", '''
        THRESHOLD = 0.5
        class Scorer:
            def __call__(self, completions, samples):
                return [1.0] * len(completions)
        async def remote(completions, samples):
            return [1.0] * len(completions)
        def one(completions):
            return [1.0] * len(completions)
        def needs_target(completions, samples, *, target):
            return [1.0] * len(completions)
        def takes_lengths(completions, samples, *, completion_lengths):
            return [float(n) for n in completion_lengths]
    ''')  # fmt: skip
    name, kwargs, pattern = ERRORS[case]
    with pytest.raises(UserRewardError, match=pattern.format(tmp=re.escape(str(in_tmp)))) as info:
        RewardSpec(name, kwargs=kwargs)
    assert str(info.value).startswith(f"reward {name!r}: ")
    # fixing the spec makes it load: a required keyword given by the spec, a required runtime keyword
    RewardSpec("rewards/shapes.py:needs_target", kwargs={"target": 3})
    assert RewardSpec("rewards/shapes.py:takes_lengths").info.params == frozenset({"completion_lengths"})


def test_config_error_from_a_typed_config(in_tmp: Path) -> None:
    @dataclass
    class Cfg:
        rewards: list[RewardSpec] = field(default_factory=list)

    with pytest.raises(
        ConfigError, match=r"config.rewards\[1\]: reward 'rewards/good.py:gold'.* has no function"
    ):
        build(Cfg, {"rewards": [{"name": "accuracy"}, {"name": "rewards/good.py:gold"}]})


# ---------------------------------------------------------------------------------------------- key, label


def test_keys_labels_and_collisions(in_tmp: Path) -> None:
    _write(in_tmp / "other" / "good.py", GOOD)
    _write(
        in_tmp / "rewards" / "accuracy.py",
        "def accuracy(completions, samples):\n    return [0.5] * len(completions)\n",
    )
    a, b = "rewards/good.py:length_bonus", "other/good.py:length_bonus"
    with pytest.raises(ValueError, match=r"duplicate reward key 'length_bonus' \(rewards/good.py:length_bonus and "
                                         r"other/good.py:length_bonus\): give repeated rewards distinct labels .*"
                                         r"defaults to the function's name"):  # fmt: skip
        specs_or_names([RewardSpec(a), RewardSpec(b)], [])
    with pytest.raises(ValueError, match="duplicate reward key 'length_bonus'"):
        combine([RewardSpec(a), RewardSpec(b)], ["x"], _samples(1))
    specs = [RewardSpec(a), RewardSpec(b, 1.0, {"scale": 2.0}, label="long_bonus")]
    _, per_reward, metrics = combine(specs, ["xy"], _samples(1))
    assert per_reward == {"length_bonus": [2.0], "long_bonus": [4.0]} and "reward/long_bonus/mean" in metrics
    # a user function named like a built-in collides with it too
    with pytest.raises(ValueError, match="duplicate reward key 'accuracy'"):
        specs_or_names([RewardSpec("accuracy"), RewardSpec("rewards/accuracy.py:accuracy")], [])
    assert [s.key for s in specs_or_names([], ["accuracy", "rewards/good.py:pid"])] == ["accuracy", "pid"]


# ------------------------------------------------------------------------------------ misbehaving rewards


def test_in_process_raise_wrong_length_and_non_numbers_become_none(
    in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = RewardSpec("rewards/hostile.py:hostile")
    completions = ["ok", "raise", "ok", "length", "nan", "text", "none", "ok"]
    with caplog.at_level(logging.WARNING, logger="vlrl.rewards"):
        total, per_reward, metrics = combine(
            [spec], completions, _samples(8), runner=RewardRunner(chunk_size=4)
        )
    assert per_reward["hostile"] == [1.0, None, 1.0, None, None, None, None, 1.0]
    assert total == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # None adds 0 to the weighted total
    # raise, wrong length, NaN, a string are errors; a None returned is not
    assert metrics["reward/hostile/errors"] == 4.0
    assert metrics["reward/hostile/none"] == 5.0 and metrics["reward/hostile/mean"] == 1.0
    assert "runs in-process, where no time limit applies" in caplog.text
    # the first failure says why (later ones go to the debug log)
    assert "reward hostile failed on items 1..2 (counted, scored None): RuntimeError: boom" in caplog.text
    assert "values for" not in caplog.text


@pytest.mark.slow
def test_worker_pool_loads_user_rewards_by_name_and_isolates_failures(in_tmp: Path) -> None:
    specs = [RewardSpec("rewards/good.py:pid"), RewardSpec("rewards/good.py:answer_is_gold"),
             RewardSpec("vlrl.rewards.accuracy:accuracy_reward", label="acc")]  # fmt: skip
    hostile = RewardSpec("rewards/hostile.py:hostile")
    with RewardRunner(workers=2, timeout=TIMEOUT, chunk_size=4, fast_path=False) as pool:
        _, per_reward, _ = combine(specs, ["3", "4", "<answer>3</answer>"], _samples(3), runner=pool)
        assert all(v is not None and v != float(os.getpid()) for v in per_reward["pid"])  # ran in a worker
        assert per_reward["answer_is_gold"] == [1.0, 0.0, 0.0] and per_reward["acc"] == [1.0, 0.0, 1.0]
        completions = ["ok", "raise", "ok", "ok", "hang", "ok", "length", "ok", "nan", "text", "ok", "ok"]
        start = time.perf_counter()
        _, per_reward, metrics = combine([hostile], completions, _samples(12), runner=pool)
        elapsed = time.perf_counter() - start
        expected = [1.0 if c == "ok" else None for c in completions]
        assert per_reward["hostile"] == expected
        assert metrics["reward/hostile/timeouts"] == 1.0  # the hanging item, killed at the time limit
        assert metrics["reward/hostile/errors"] == 4.0  # raise, wrong length, NaN, a string
        assert elapsed < 55  # a hang bound: only waiting out the 60 s sleep comes near it
        # the pool recovered from the killed worker and still serves both
        _, per_reward, _ = combine([hostile, specs[1]], ["ok", "3"], _samples(2), runner=pool)
        assert per_reward == {"hostile": [1.0, 1.0], "answer_is_gold": [0.0, 1.0]}
        assert pool.stats["hostile"].timeouts == 1


# -------------------------------------------------------------------------------------------- vlrl score


@pytest.mark.slow
def test_vlrl_score_with_a_file_reward(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlrl.cli import main

    rows = [{"completion": "3", "answer": "3", "problem_type": "numerical"},
            {"completion": "<answer>4</answer>", "answer": "3", "problem_type": "numerical"},
            {"completion": "raise", "answer": "3", "problem_type": "numerical"}]  # fmt: skip
    data = _write(in_tmp / "in.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = in_tmp / "out.jsonl"
    args = ["score", "--data", str(data), "--out", str(out)]
    assert main([*args, "--reward", "rewards/good.py:answer_is_gold"]) == 0
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.0, 0.0, 0.0]
    assert "numerical" in capsys.readouterr().out
    # several rewards, one with a label, scored in a worker process
    rewards = ["accuracy", "gold=rewards/good.py:answer_is_gold", "rewards/hostile.py:hostile"]
    assert (
        main([*args, *(w for r in rewards for w in ("--reward", r)), "--workers", "1", "--timeout", "5"]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["rewards"] for line in lines] == [
        {"accuracy": 1.0, "gold": 1.0, "hostile": 1.0},
        {"accuracy": 0.0, "gold": 0.0, "hostile": 1.0},
        {"accuracy": 0.0, "gold": 0.0, "hostile": None},
    ]
    assert [line["reward"] for line in lines] == [3.0, 1.0, None]  # a line with an unscored reward is null
    capsys.readouterr()
    assert main([*args, "--reward", "rewards/good.py:gold"]) == 2
    assert "config error: --reward: reward 'rewards/good.py:gold': file" in capsys.readouterr().err


def test_the_shipped_example_follows_its_docstring() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "rewards" / "concise_correct.py"
    spec = RewardSpec(f"{example}:concise_correct", kwargs={"target_length": 2, "min_value": 0.5})
    completions = ["<answer>3</answer>", "it is <answer>3</answer>", "a b c d e <answer>3</answer>",
                   "<answer>4</answer>"]  # fmt: skip
    samples = _samples(3) + [Sample(id="x", images=[], messages=[], answer="seven", problem_type="numerical")]
    _, per_reward, _ = combine([spec], completions, samples)
    assert per_reward["concise_correct"] == [1.0, 0.75, 0.5, None]  # 1, 3 and 6 words; a gold it cannot read
    _, per_reward, _ = combine([spec], completions[:2], samples[:2], completion_lengths=[2, 4])
    assert per_reward["concise_correct"] == [1.0, 0.5]  # the trainer's token counts win


def test_a_module_that_fails_to_import_names_its_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "brokenpkg" / "__init__.py", "")
    _write(tmp_path / "brokenpkg" / "scoring.py", "import os\nTABLE = {}['missing']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = (f"reward 'brokenpkg.scoring:f': cannot import module brokenpkg.scoring: KeyError: 'missing' "
                f"({tmp_path / 'brokenpkg' / 'scoring.py'}, line 2)")  # fmt: skip
    with pytest.raises(UserRewardError, match=re.escape(expected)):
        RewardSpec("brokenpkg.scoring:f")


def test_a_home_directory_that_cannot_be_expanded_is_a_user_reward_error() -> None:
    """Found by tests/fuzz/test_fuzz_rewards.py: ``~nosuchuser/...`` raised pathlib's RuntimeError, not the
    documented UserRewardError (a config error naming the spec)."""
    from vlrl.rewards.user import parse_target

    with pytest.raises(UserRewardError, match="~nosuchuser-vlrl/r.py"):
        parse_target("~nosuchuser-vlrl/r.py:fn")
