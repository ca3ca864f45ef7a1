"""`make demo`'s pipeline over several seeds (data and model initialisation), each in its own process, and the
demo's claims checked per seed (not a test: each seed is a whole demo run).

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --threads 2 --one-thread-seeds 0 \
        --out benchmarks/results/demo_seeds.json

(`--one-thread-seeds`: those seeds again with one torch thread, whose numerics differ from two threads.)

Writes `{"seeds": [{"seed", "threads", "seconds", "tasks": {TASK: {"chance", "sft", "rl", "sft_more",
"rl_trained"}}, "claims": {NAME: bool}}], "summary": {TASK: {STAGE: {"mean", "min", "max"}}}}` and prints a
Markdown table for benchmarks/README.md. A seed whose demo folder already holds summary.json is read, not rerun.

The claims (the demo's README promises them on any machine and seed):
  sft_2x_chance            every reported task is at least twice chance after SFT
  rl_beats_sft_by_5        over the RL-trained tasks (their mean, the demo's `rl_trained_mean`), RL >= SFT + 5 points
  rl_beats_sft_more        over the RL-trained tasks (their mean), RL > the equal-time SFT control
  rl_loses_at_most_2       no task loses more than 2 points to RL
  n_test_1000              every task is evaluated on 1,000 held-out items
  within_20_minutes        the whole demo takes at most 20 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

STAGES = ("sft", "rl", "sft_more")


def claims(summary: dict[str, Any]) -> dict[str, bool]:
    """The demo's claims on one run's summary.json (accuracies are fractions; points are percentage points)."""
    tasks = summary["tasks"]
    rl_tasks = [t for t, row in tasks.items() if row.get("rl_trained")]

    def mean(stage: str) -> float:  # over the RL-trained tasks: a task near its ceiling cannot gain 5 points alone
        return sum(tasks[t][stage] for t in rl_tasks) / len(rl_tasks)

    return {
        "sft_2x_chance": all(row["sft"] >= 2 * row["chance"] for row in tasks.values()),
        "rl_beats_sft_by_5": mean("rl") >= mean("sft") + 0.05,
        "rl_beats_sft_more": mean("rl") > mean("sft_more"),
        "rl_loses_at_most_2": all(row["rl"] >= row["sft"] - 0.02 for row in tasks.values()),
        "n_test_1000": all(row["n"] >= 1000 for row in tasks.values()),
        "within_20_minutes": summary["seconds"] <= 20 * 60,
    }


def seed_record(seed: int, threads: int, summary: dict[str, Any]) -> dict[str, Any]:
    tasks = {t: {"chance": row["chance"], **{k: row[k] for k in STAGES}, "rl_trained": bool(row.get("rl_trained"))}
             for t, row in summary["tasks"].items()}
    return {"seed": seed, "threads": threads, "seconds": summary["seconds"], "tasks": tasks,
            "claims": claims(summary)}


def spread(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, min and max over the seeds, per task and stage."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in records[0]["tasks"]:
        out[task] = {}
        for stage in STAGES:
            xs = [r["tasks"][task][stage] for r in records]
            out[task][stage] = {"mean": round(sum(xs) / len(xs), 4), "min": min(xs), "max": max(xs)}
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    names = list(records[0]["claims"])
    lines = ["| seed | threads | minutes | " + " | ".join(f"{t} sft / rl / sft_more" for t in records[0]["tasks"])
             + " | claims failed |",
             "|---" * (4 + len(records[0]["tasks"])) + "|"]
    for r in records:
        cells = [f"{100 * v['sft']:.1f} / {100 * v['rl']:.1f} / {100 * v['sft_more']:.1f}" for v in r["tasks"].values()]
        failed = [n for n in names if not r["claims"][n]] or ["none"]
        lines.append(f"| {r['seed']} | {r['threads']} | {r['seconds'] / 60:.1f} | " + " | ".join(cells)
                     + f" | {', '.join(failed)} |")
    return "\n".join(lines)


def run_seed(seed: int, threads: int, work: Path) -> dict[str, Any]:
    out = work / f"seed-{seed}-threads-{threads}"
    summary = out / "summary.json"
    if not summary.exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "vlrl.demo", f"out={out}", f"seed={seed}", f"threads={threads}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
    loaded: dict[str, Any] = json.loads(summary.read_text())
    return loaded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the --seeds runs")
    p.add_argument("--one-thread-seeds", type=int, nargs="*", default=[], help="seeds run again with 1 thread")
    p.add_argument("--work", default="runs/demo-seeds", help="where the demo runs go")
    p.add_argument("--out", default="benchmarks/results/demo_seeds.json")
    a = p.parse_args()
    runs = [(s, a.threads) for s in a.seeds] + [(s, 1) for s in a.one_thread_seeds]
    records = [seed_record(s, t, run_seed(s, t, Path(a.work))) for s, t in runs]
    result = {"seeds": records, "summary": spread(records)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(markdown(records))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
