"""Registry, RewardSpec validation and the weighted combination; import hygiene."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from vlrl.data.sample import Sample
from vlrl.rewards.registry import RewardSpec, combine, get_reward, list_rewards, register_reward, reward_info

BUILT_IN = {"accuracy", "answer_format", "cosine", "det_ap", "det_vlmr1", "format", "format_lenient", "iou",
            "iou_hit", "iou_mixed", "overlong", "repetition", "tag_count"}  # fmt: skip


def _samples(answers: list[str], problem_type: str = "numerical") -> list[Sample]:
    return [
        Sample(id=str(i), images=[], messages=[], answer=a, problem_type=problem_type)
        for i, a in enumerate(answers)
    ]


def test_built_ins_registered_and_unknown_lists_names() -> None:
    assert BUILT_IN <= set(list_rewards())
    with pytest.raises(KeyError, match="accuracy, answer_format"):
        get_reward("nope")
    assert reward_info("overlong").value_range == (-1.0, 0.0)
    assert reward_info("format").cheap and not reward_info("accuracy").cheap


def test_register_duplicate_name_rejected() -> None:
    @register_reward("test_registry_dummy")
    def dummy(completions: list[str], samples: list[Sample], *, scale: float = 1.0) -> list[float | None]:
        return [scale] * len(completions)

    register_reward("test_registry_dummy")(dummy)  # same function again: fine

    def other(completions: list[str], samples: list[Sample]) -> list[float | None]:
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_registry_dummy")(other)
    assert reward_info("test_registry_dummy").params == frozenset({"scale"})


def test_spec_rejects_unknown_kwargs() -> None:
    with pytest.raises(ValueError, match="valid: .*max_length"):
        RewardSpec("overlong", 1.0, {"max_len": 10})
    with pytest.raises(ValueError, match="rel_tol"):
        RewardSpec("accuracy", 1.0, {"rel_tolerance": 0.1})
    with pytest.raises(KeyError):
        RewardSpec("nope")
    RewardSpec("accuracy", 1.0, {"rel_tol": 0.1, "free_form_metric": "rouge_l"})


def test_combine_weighted_sum_none_counts_zero_and_metrics() -> None:
    samples = _samples(["3", "3", "x", "3"])
    completions = ["<think>t</think><answer>3</answer>", "<answer>4</answer>", "<answer>3</answer>", "3"]
    specs = [
        RewardSpec("accuracy", 1.0),
        RewardSpec("format", 0.5),
        RewardSpec("overlong", 2.0, {"max_length": 2, "cache_length": 1}),
    ]
    total, per_reward, metrics = combine(specs, completions, samples, completion_lengths=[1, 2, 2, 3])
    assert per_reward["accuracy"] == [1.0, 0.0, None, 1.0]
    assert per_reward["format"] == [1.0, 0.0, 0.0, 0.0]
    assert per_reward["overlong"] == [0.0, -1.0, -1.0, -1.0]
    assert total == pytest.approx([1.5, -2.0, -2.0, -1.0])
    assert metrics["reward/accuracy/none"] == 1.0
    assert metrics["reward/accuracy/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/format/mean"] == pytest.approx(0.25)
    assert metrics["reward/overlong/mean"] == pytest.approx(-0.75)
    assert metrics["reward/total/mean"] == pytest.approx(-3.5 / 4)
    assert metrics["reward/accuracy/errors"] == 0.0 and metrics["reward/accuracy/timeouts"] == 0.0


def test_combine_labels_for_repeated_rewards() -> None:
    samples = _samples(["3"])
    specs = [RewardSpec("accuracy", 1.0), RewardSpec("accuracy", 1.0, {"rel_tol": 0.5}, label="acc_loose")]
    total, per_reward, _ = combine(specs, ["<answer>4</answer>"], samples)
    assert per_reward == {"accuracy": [0.0], "acc_loose": [1.0]} and total == [1.0]
    with pytest.raises(ValueError, match="duplicate"):
        combine([RewardSpec("accuracy"), RewardSpec("accuracy")], ["3"], samples)


def test_combine_counts_a_raising_reward_as_error() -> None:
    @register_reward("test_registry_raises")
    def raises(completions: list[str], samples: list[Sample], **_: Any) -> list[float | None]:
        if any("bad" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    total, per_reward, metrics = combine(
        [RewardSpec("test_registry_raises")], ["ok", "bad", "ok"], _samples(["1"] * 3)
    )
    assert per_reward["test_registry_raises"] == [1.0, None, 1.0]
    assert total == [1.0, 0.0, 1.0]
    assert (
        metrics["reward/test_registry_raises/errors"] == 1.0
        and metrics["reward/test_registry_raises/none"] == 1.0
    )


def test_import_does_not_pull_torch_or_sympy() -> None:
    code = "import sys, vlrl.rewards; bad = [m for m in ('torch', 'sympy', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
