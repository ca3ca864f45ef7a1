"""Score a JSONL file of completions offline: the function behind ``vlrl score --data IN --out OUT``.

Input: one JSON object per line (blank lines are skipped) with

- ``completion`` (str), ``answer`` (str; a number or a list such as a box is accepted and turned into
  its JSON text), ``problem_type`` (one of `vlrl.data.sample.PROBLEM_TYPES`);
- optional metadata, at top level or inside a ``metadata`` object (top level wins): ``options``
  (multiple choice: list in letter order or dict letter -> text), ``answers`` (further acceptable
  answers for ocr / free_form), ``image_size`` [w, h], ``coord_space`` (pixel / resized / norm1000 /
  norm1), ``min_pixels``, ``max_pixels``, ``factor`` (grounding), ``completion_length`` (tokens), ``task``;
- optional ``id``;
- optional ``expected``: the correct verdict from another grader or a person (``true``/``false``, 1/0, or a
  number in [0, 1]), for ``--report``.

A malformed line raises `ScoreInputError` naming the file, the line number and the field.

Output: each input object plus ``reward`` and ``extracted`` (the answer `extract_answer` finds, or null).
``reward`` is the weighted sum of the rewards (with the default single ``accuracy`` of weight 1: its value),
null if any of them could not score; with several rewards, ``rewards`` maps each to its own value.

Rewards are registry names or rewards of the user's own, ``path/to/file.py:function`` or ``package.module:function``
(`vlrl.rewards.user`; a relative path is resolved against the current directory); on the command line
``--reward LABEL=NAME`` gives one a label (two user functions of the same name need one).

Returns (and with ``print_summary`` prints) ``{"n", "mean_reward", "n_none", "by_problem_type": {type:
{"n", "mean_reward", "n_none"}}, "rewards", "seconds"}``, where ``mean_reward`` is the mean over the
lines whose ``reward`` is not null (null if there is none), so it can be recomputed from the output.

With ``report=True`` the summary also holds ``"agreement"``: per problem type and over all lines that carry
``expected``, ``{"n", "agree", "false_positive", "false_negative", "unscored", "agreement", "lines"}``. A line
agrees when (reward >= ``threshold``) == (expected >= 0.5); a null reward counts as a disagreement
(``unscored``); ``lines`` lists the line numbers of the first 20 disagreements. Each output line then also
holds ``agrees``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlrl.data.errors import DataError
from vlrl.data.sample import PROBLEM_TYPES, Sample
from vlrl.data.screen import (
    DEFAULT_MAX_LINE_BYTES,
    NESTING_MESSAGE,
    TextLimits,
    bounded_lines,
    line_too_long,
    record_problem,
)
from vlrl.rewards.boxes import COORD_SPACES
from vlrl.rewards.extract import DEFAULT_MODES, extract_answer
from vlrl.rewards.registry import RewardSpec, check_reward_keys, combine
from vlrl.rewards.runner import RewardRunner

META_FIELDS = (
    "options", "answers", "image_size", "coord_space", "min_pixels", "max_pixels", "factor", "completion_length", "task",
)  # fmt: skip


class ScoreInputError(DataError):
    """A malformed input line: the message names file, line and field (a `DataError`, which the CLI reports)."""


def _fail(path: Path, lineno: int, message: str, field: str | None = None) -> ScoreInputError:
    return ScoreInputError(path, lineno, field, message)


def _parse_line(path: Path, lineno: int, raw: bytes | None, limits: TextLimits) -> Any:
    """One input line as JSON, refused with its line number when it cannot be: too long, not UTF-8, invalid,
    nested past `limits.max_depth`, or holding a lone surrogate (which no output file can encode)."""
    if raw is None:
        raise _fail(path, lineno, line_too_long(limits))
    try:
        record = json.loads(raw)
    except RecursionError:
        raise _fail(path, lineno, NESTING_MESSAGE.format(limits.max_depth)) from None
    except json.JSONDecodeError as exc:
        raise _fail(path, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # not UTF-8; an integer of too many digits
        raise _fail(path, lineno, f"invalid JSON: {exc}") from None
    problem = record_problem(record, limits)
    if problem is not None:
        raise _fail(path, lineno, problem[1], problem[0])
    return record


def _answer_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, list, dict)) and not isinstance(value, bool):
        return json.dumps(value)
    return None


def _check_metadata(meta: dict[str, Any], problem_type: str, path: Path, lineno: int) -> None:
    if "options" in meta and not isinstance(meta["options"], (list, dict)):
        raise _fail(path, lineno, "field 'options' must be a list (letter order) or an object letter -> text")
    if "answers" in meta and not isinstance(meta["answers"], list):
        raise _fail(path, lineno, "field 'answers' must be a list of strings")
    if problem_type != "grounding":
        return
    space = meta.get("coord_space", "pixel")
    if space not in COORD_SPACES:
        raise _fail(path, lineno, f"field 'coord_space' is {space!r}; valid: {', '.join(COORD_SPACES)}")
    size = meta.get("image_size")
    if size is not None or space != "pixel":
        ok = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        if not ok:
            raise _fail(
                path,
                lineno,
                f"field 'image_size' must be [w, h] with positive integers (coord_space {space!r})",
            )
    for key in ("min_pixels", "max_pixels", "factor"):
        if key in meta and not (isinstance(meta[key], int) and meta[key] > 0):
            raise _fail(path, lineno, f"field {key!r} must be a positive integer")


def _expected(record: dict[str, Any], path: Path, lineno: int) -> float | None:
    if "expected" not in record:
        return None
    value = record["expected"]
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return float(value)
    raise _fail(path, lineno, f"field 'expected' must be true/false or a number in [0, 1], got {value!r}")


def _sample(record: Any, path: Path, lineno: int) -> tuple[Sample, str]:
    if not isinstance(record, dict):
        raise _fail(path, lineno, f"expected a JSON object, got {type(record).__name__}")
    for key in ("completion", "answer", "problem_type"):
        if key not in record:
            raise _fail(path, lineno, f"missing field {key!r}")
    completion = record["completion"]
    if not isinstance(completion, str):
        raise _fail(path, lineno, f"field 'completion' must be a string, got {type(completion).__name__}")
    answer = _answer_text(record["answer"])
    if answer is None:
        raise _fail(
            path, lineno, f"field 'answer' must be a string or number, got {type(record['answer']).__name__}"
        )
    problem_type = record["problem_type"]
    if problem_type not in PROBLEM_TYPES:
        raise _fail(
            path, lineno, f"field 'problem_type' is {problem_type!r}; valid: {', '.join(PROBLEM_TYPES)}"
        )
    meta = record.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _fail(path, lineno, "field 'metadata' must be an object")
    meta = {**meta, **{k: record[k] for k in META_FIELDS if k in record}}
    _check_metadata(meta, problem_type, path, lineno)
    _expected(record, path, lineno)
    sample = Sample(
        id=str(record.get("id", lineno)),
        images=[],
        messages=[],
        answer=answer,
        problem_type=problem_type,
        metadata=meta,
    )
    return sample, completion


def read_score_input(path: str | Path) -> tuple[list[dict[str, Any]], list[Sample], list[str]]:
    """(records, samples, completions) of a score input file; raises `ScoreInputError` on a bad line.
    Each sample's ``metadata["line"]`` is its line number."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    samples: list[Sample] = []
    completions: list[str] = []
    # completions may be long (a model's whole reasoning): only lines, nesting and surrogates are bounded here
    limits = TextLimits(max_text_chars=DEFAULT_MAX_LINE_BYTES)
    with path.open("rb") as f:
        for lineno, line in bounded_lines(f, limits.max_line_bytes):
            if line is not None and not line.strip():
                continue
            record = _parse_line(path, lineno, line, limits)
            sample, completion = _sample(record, path, lineno)
            sample.metadata.setdefault("line", lineno)
            records.append(record)
            samples.append(sample)
            completions.append(completion)
    return records, samples, completions


def _specs(
    rewards: Sequence[str | RewardSpec], reward_kwargs: dict[str, dict[str, Any]] | None
) -> list[RewardSpec]:
    kwargs = reward_kwargs or {}
    specs = [r if isinstance(r, RewardSpec) else RewardSpec(r, 1.0, dict(kwargs.get(r, {}))) for r in rewards]
    check_reward_keys(specs)
    return specs


_LABEL = re.compile(r"^([A-Za-z_][\w.-]*)=(.+)$")


def reward_specs_from_args(values: Sequence[str]) -> list[RewardSpec]:
    """``vlrl score --reward`` values as specs of weight 1: ``NAME`` or ``LABEL=NAME``, NAME a registered reward or
    ``path.py:function`` / ``module:function``. A bad name raises KeyError / ValueError naming it."""
    specs = []
    for value in values:
        match = _LABEL.match(value)
        label, name = (match.group(1), match.group(2)) if match else (None, value)
        specs.append(RewardSpec(name, 1.0, label=label))
    check_reward_keys(specs)
    return specs


def _summary(problem_types: list[str], rewards: list[float | None]) -> dict[str, Any]:
    def stats(values: list[float | None]) -> dict[str, Any]:
        scored = [v for v in values if v is not None]
        return {
            "n": len(values),
            "mean_reward": sum(scored) / len(scored) if scored else None,
            "n_none": len(values) - len(scored),
        }

    by_type: dict[str, list[float | None]] = {}
    for pt, value in zip(problem_types, rewards):
        by_type.setdefault(pt, []).append(value)
    return {**stats(rewards), "by_problem_type": {pt: stats(v) for pt, v in sorted(by_type.items())}}


def _agreement(
    records: list[dict[str, Any]], samples: list[Sample], rewards: list[float | None], threshold: float
) -> dict[str, Any]:
    def empty() -> dict[str, Any]:
        return {"n": 0, "agree": 0, "false_positive": 0, "false_negative": 0, "unscored": 0, "lines": []}

    groups: dict[str, dict[str, Any]] = {}
    total = empty()
    for record, sample, reward in zip(records, samples, rewards):
        if "expected" not in record:
            continue
        want = float(record["expected"]) >= 0.5
        kind = "unscored" if reward is None else "agree" if (reward >= threshold) == want else (
            "false_positive" if want is False else "false_negative")  # fmt: skip
        for group in (groups.setdefault(sample.problem_type, empty()), total):
            group["n"] += 1
            group[kind] += 1
            if kind != "agree" and len(group["lines"]) < 20:
                group["lines"].append(sample.metadata["line"])
    for group in (*groups.values(), total):
        group["agreement"] = group["agree"] / group["n"] if group["n"] else None
    return {"by_problem_type": dict(sorted(groups.items())), "all": total, "threshold": threshold}


def _print_agreement(report: dict[str, Any]) -> None:
    print(f"\nagreement with 'expected' (reward >= {report['threshold']} counts as correct)")
    print(f"{'problem_type':<18}{'n':>7}{'agree':>7}{'false+':>8}{'false-':>8}{'none':>6}{'agreement':>11}")
    for pt, g in (*report["by_problem_type"].items(), ("all", report["all"])):
        value = "-" if g["agreement"] is None else f"{g['agreement']:.4f}"
        print(f"{pt:<18}{g['n']:>7}{g['agree']:>7}{g['false_positive']:>8}{g['false_negative']:>8}"
              f"{g['unscored']:>6}{value:>11}")  # fmt: skip
    if report["all"]["lines"]:
        print("disagreeing lines (first 20): " + ", ".join(map(str, report["all"]["lines"])))


def _print_summary(summary: dict[str, Any]) -> None:
    def fmt(mean: float | None) -> str:
        return "-" if mean is None else f"{mean:.4f}"

    print(f"{'problem_type':<18}{'n':>8}{'mean_reward':>14}{'n_none':>8}")
    for pt, s in summary["by_problem_type"].items():
        print(f"{pt:<18}{s['n']:>8}{fmt(s['mean_reward']):>14}{s['n_none']:>8}")
    print(f"{'all':<18}{summary['n']:>8}{fmt(summary['mean_reward']):>14}{summary['n_none']:>8}")


def _write_whole(out: Path, rows: list[str]) -> None:
    """Write `rows` to `out` through a temporary file renamed over it: a failure mid-way leaves no partial output
    (and an older `out` intact)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(rows)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def score_file(
    in_path: str | Path,
    out_path: str | Path,
    *,
    rewards: Sequence[str | RewardSpec] = ("accuracy",),
    reward_kwargs: dict[str, dict[str, Any]] | None = None,
    workers: int = 0,
    timeout: float = 10.0,
    runner: RewardRunner | None = None,
    print_summary: bool = True,
    report: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Score every line of `in_path`, write `out_path`, return the summary (see module doc).

    `rewards` are reward names (configured by `reward_kwargs[name]`) or `RewardSpec`s; `workers` > 0
    scores in a `RewardRunner` process pool with a `timeout` per call (ignored when `runner` is given).
    """
    start = time.perf_counter()
    specs = _specs(rewards, reward_kwargs)
    records, samples, completions = read_score_input(in_path)
    owned = runner is None
    active = runner if runner is not None else RewardRunner(workers=workers, timeout=timeout)
    try:
        total, per_reward, _ = combine(specs, completions, samples, runner=active)
    finally:
        if owned:
            active.close()
    modes = next((s.kwargs.get("modes", DEFAULT_MODES) for s in specs if s.name == "accuracy"), DEFAULT_MODES)
    line_rewards: list[float | None] = []
    rows = []
    for i, record in enumerate(records):
        values = {spec.key: per_reward[spec.key][i] for spec in specs}
        value = None if any(v is None for v in values.values()) else total[i]
        line_rewards.append(value)
        row = {**record, "reward": value, "extracted": extract_answer(completions[i], modes)}
        if len(specs) > 1:
            row["rewards"] = values
        if report and "expected" in record:
            row["agrees"] = value is not None and (value >= threshold) == (float(record["expected"]) >= 0.5)
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    _write_whole(Path(out_path), rows)
    summary = _summary([s.problem_type for s in samples], line_rewards)
    summary["rewards"] = [spec.key for spec in specs]
    if report:
        summary["agreement"] = _agreement(records, samples, line_rewards, threshold)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if print_summary:
        _print_summary(summary)
        if report:
            _print_agreement(summary["agreement"])
    return summary
