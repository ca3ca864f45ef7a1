"""Scoring 10,000 completions with the `accuracy` reward: per-item time against the reward time limits.

    .venv/bin/python benchmarks/score_speed.py --n 10000 --out benchmarks/results/score_speed.json

Completions are drawn (seeded) from the regression corpus (`tests/rewards/corpus/`: math-verify's own test
cases and vlrl's cases of every failure class, multiple choice, numbers, units, long chains of thought);
every third one gets a `<think>` block of 200-3,000 characters in front, as an R1-style model writes. Two runs
of the same 10,000 lines:

- in-process: `score_answer` per line, timed one by one: median, p99 and max per item against
  `math_timeout` (5 s, the in-process bound of a math comparison);
- `vlrl score` path with the reward worker pool (`score_file(workers=2)`: chunks of 8 completions, a 10 s
  limit per chunk, the limit RL's `reward_workers` use): wall time and the time-outs / errors it counted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlrl.rewards.accuracy import score_answer
from vlrl.rewards.runner import RewardRunner
from vlrl.rewards.score import score_file

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "rewards" / "corpus"


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    for line in (CORPUS / "vlrl_cases.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        pool.append({k: case[k] for k in ("completion", "answer", "problem_type", "options") if k in case})
    for line in (CORPUS / "mathverify_cases.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        pool.append({"completion": case["pred"], "answer": case["gold"], "problem_type": "math"})
    words = "the area of the triangle is half the base times the height so we compute 3 4 12 and".split()
    rows = []
    for i in range(n):
        row = dict(rng.choice(pool))
        if i % 3 == 0:
            think = " ".join(rng.choice(words) for _ in range(rng.randint(40, 600)))
            row["completion"] = f"<think>{think}</think>" + row["completion"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="results JSON")
    a = p.parse_args(argv)
    rows = _rows(a.n, a.seed)

    score_answer("1", "1", "math")  # import math-verify and sympy outside the timing
    times, nones = [], 0
    start = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        value = score_answer(row["completion"], row["answer"], row["problem_type"], metadata=row)
        times.append(time.perf_counter() - t0)
        nones += value is None
    in_process = time.perf_counter() - start
    times.sort()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        warm = Path(tmp) / "warm.jsonl"
        warm.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:32]), encoding="utf-8"
        )
        with RewardRunner(workers=a.workers, timeout=10.0) as runner:
            score_file(
                warm, Path(tmp) / "warm_out.jsonl", runner=runner, print_summary=False
            )  # start the workers
            runner.stats.clear()
            t0 = time.perf_counter()
            summary = score_file(src, Path(tmp) / "out.jsonl", runner=runner, print_summary=False)
            pool_seconds = time.perf_counter() - t0
            stats = runner.stats.get("accuracy")
    result = {
        "n": a.n,
        "in_process": {
            "seconds": round(in_process, 2),
            "items_per_s": round(a.n / in_process, 1),
            "median_ms": round(1000 * statistics.median(times), 3),
            "p99_ms": round(1000 * times[int(0.99 * (len(times) - 1))], 2),
            "max_ms": round(1000 * times[-1], 1),
            "none": nones,
            "limit_s": 5.0,
        },
        "pool": {
            "workers": a.workers,
            "chunk_size": 8,
            "chunk_limit_s": 10.0,
            "seconds": round(pool_seconds, 2),
            "timeouts": stats.timeouts if stats else None,
            "errors": stats.errors if stats else None,
            "none": summary["n_none"],
        },
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
