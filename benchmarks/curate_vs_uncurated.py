"""RL on a rollout-curated set against RL on an uncurated set of the same size (an experiment, not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_vs_uncurated.py --sft /tmp/curate/sft \\
        --data-dir /tmp/curate/data/counting --config /tmp/curate/tiny-grpo.yaml --out /tmp/curate/exp

1. `vlrl curate` over the first `--pool` items of the task's train split (N samples each, the RL sampling
   temperature and answer length), keeping LOW < mean accuracy < HIGH (and min < max);
2. the same curation again with another sampling seed (`--retest-seed`): how well one item's pass rate
   predicts the next (Pearson r of the per-item pass rates, overlap of the kept sets) -- whether the filter
   selects a property of the item or the luck of its N draws;
3. per RL seed (`--rl-seeds`): an uncurated control (a random subset of the same pool, as large as the kept
   set, drawn with that seed), and `vlrl rl` from the same SFT checkpoint on the curated and on the control
   set with the same recipe, seed and number of steps (no wall-time cap, no validation), one thread;
4. `vlrl eval` (greedy) of the SFT checkpoint and every RL result on the held-out test split;
5. a table in `<out>/RESULTS.md` and the numbers in `<out>/results.json`.

Every stage runs the `vlrl` command line in a subprocess (what a user would run); a stage whose output is
already there is not run again, so an interrupted experiment resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def vlrl(*args: str) -> float:
    """Run `vlrl ARGS` with one thread; returns its wall time (s). A failure stops the experiment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlrl.cli", *args], env=env)
    if proc.returncode != 0:
        sys.exit(f"vlrl {' '.join(args)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def write_pool(data_dir: Path, pool: int, out: Path) -> Path:
    """The first `pool` train records, image paths made absolute (so subsets can live anywhere)."""
    rows = read_jsonl(data_dir / "train.jsonl")[:pool]
    for r in rows:
        r["image"] = str((data_dir / r["image"]).resolve())
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def curate(a: argparse.Namespace, pool: Path, out: Path, seed: int, times: dict[str, float], key: str
           ) -> dict[str, Any]:
    # always run: once every item is sampled, `vlrl curate` only re-filters (another --band costs no sampling)
    seconds = vlrl("curate", "--model", a.sft, "--data", str(pool), "--out", str(out), f"n={a.n}",
                   "--band", a.band, f"max_new_tokens={a.max_new_tokens}", f"temperature={a.temperature}",
                   f"batch_size={a.curate_batch}", f"seed={seed}", "threads=1")
    times.setdefault(key, seconds)  # the first call's (the one that sampled)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def retest(first: Path, second: Path) -> dict[str, float]:
    """Agreement of two curations of the same items with different sampling seeds."""
    a = {r["id"]: r for r in read_jsonl(first / "stats.jsonl")}
    b = {r["id"]: r for r in read_jsonl(second / "stats.jsonl")}
    ids = sorted(a)
    x, y = [a[i]["pass_rate"] for i in ids], [b[i]["pass_rate"] for i in ids]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((u - mx) * (v - my) for u, v in zip(x, y))
    var = (sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y)) ** 0.5
    ka, kb = {i for i in ids if a[i]["kept"]}, {i for i in ids if b[i]["kept"]}
    kept_a = [i for i in ids if a[i]["kept"]]
    return {"pearson_r": cov / var if var else 0.0, "kept_jaccard": len(ka & kb) / max(1, len(ka | kb)),
            "kept_then_kept": len(ka & kb) / max(1, len(ka)),
            "pass_rate_kept_first": sum(a[i]["pass_rate"] for i in kept_a) / max(1, len(kept_a)),
            "pass_rate_kept_second": sum(b[i]["pass_rate"] for i in kept_a) / max(1, len(kept_a)),
            "pass_rate_all_second": my}


def uncurated_subset(pool: Path, size: int, seed: int, out: Path) -> Path:
    rows = read_jsonl(pool)
    pick = sorted(random.Random(seed).sample(range(len(rows)), size))
    out.write_text("".join(json.dumps(rows[i]) + "\n" for i in pick))
    return out


def rl(a: argparse.Namespace, data: Path, out: Path, seed: int, times: dict[str, float], key: str) -> Path:
    final = out / "checkpoints" / f"step-{a.steps}"
    if not final.exists():
        times[key] = vlrl("rl", "--config", a.config, f"model={a.sft}", f"data=[{data}]", f"out={out}",
                          f"max_steps={a.steps}", "validation.data=[]", "threads=1", "max_seconds=null",
                          f"seed={seed}", f"logging.save_every={a.steps}", f"rollout.max_new_tokens={a.max_new_tokens}",
                          f"rollout.temperature={a.temperature}")
    return final


def evaluate(a: argparse.Namespace, model: str, out: Path, times: dict[str, float], key: str) -> dict[str, Any]:
    if not out.exists():
        times[key] = vlrl("eval", "--model", model, "--data", str(Path(a.data_dir) / "test.jsonl"), "--out", str(out),
                          f"max_new_tokens={a.eval_max_new_tokens}", "batch_size=128", "threads=1")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def rl_curve(run: Path) -> dict[str, float]:
    """Mean training reward and share of zero-variance groups over the first and last quarter of the steps."""
    rows = read_jsonl(run / "metrics.jsonl")
    q = max(1, len(rows) // 4)

    def mean(key: str, part: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in part) / len(part)

    return {"reward_first_q": mean("reward/accuracy", rows[:q]), "reward_last_q": mean("reward/accuracy", rows[-q:]),
            "zero_std_first_q": mean("frac_zero_std_groups", rows[:q]),
            "zero_std_last_q": mean("frac_zero_std_groups", rows[-q:]),
            "seconds": rows[-1]["elapsed_s"]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(a: argparse.Namespace, res: dict[str, Any]) -> str:
    rep, ev, curves, times, rt = res["curate"], res["eval"], res["rl"], res["times"], res["retest"]
    lines = [
        "# RL on a rollout-curated set vs an uncurated set of the same size",
        "",
        f"SFT checkpoint `{a.sft}`; task data `{a.data_dir}`; RL recipe `{a.config}` (copied before the runs) with "
        f"max_steps={a.steps}, rollout.max_new_tokens={a.max_new_tokens}, rollout.temperature={a.temperature}, "
        f"validation.data=[], "
        f"threads=1, OMP_NUM_THREADS=1; RL seeds {a.rl_seeds} (the control subset is redrawn per seed).",
        "",
        f"## Curation (`vlrl curate`, pool = first {rep['n_items']} train items, N={a.n}, band {a.band})",
        "",
        f"- kept {rep['n_kept']} / {rep['n_items']} = {100 * rep['kept_fraction']:.1f}% "
        f"(all N wrong: {rep['none_pass']}, all N right: {rep['all_pass']})",
        f"- mean pass rate {rep['mean_pass_rate']:.3f}, greedy pass@1 {rep['pass_at_1']:.3f}, "
        f"pass@{a.n} {rep['pass_at_n']:.3f}, mean gap {rep['mean_gap']:.3f}",
        f"- time {times['curate']:.0f} s (sampling {rep['seconds_sampling']:.0f} s)",
        f"- retest with sampling seed {a.retest_seed}: Pearson r of per-item pass rates {rt['pearson_r']:.3f}; "
        f"kept again {100 * rt['kept_then_kept']:.1f}% of the kept items (Jaccard {rt['kept_jaccard']:.3f}); "
        f"the kept items' pass rate {rt['pass_rate_kept_first']:.3f} -> {rt['pass_rate_kept_second']:.3f} on "
        f"re-sampling (all items: {rt['pass_rate_all_second']:.3f})",
        "",
        "| correct of N | items |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rep["pass_histogram"].items()],
        "",
        f"## Held-out accuracy (greedy, `{Path(a.data_dir) / 'test.jsonl'}`, {ev['sft']['n']} items, "
        f"max_new_tokens {a.eval_max_new_tokens})",
        "",
        "| model | train set | RL seed | accuracy | RL train accuracy reward (first → last quarter) | "
        "zero-variance groups (first → last) | RL wall time |",
        "|---|---|---|---|---|---|---|",
        f"| SFT | — | — | {ev['sft']['accuracy']:.3f} | | | |",
    ]
    for key, name in (("curated", "curated"), ("uncurated", "uncurated (random, same size)")):
        for seed in a.rl_seeds:
            c, run = curves[f"{key}-s{seed}"], f"{key}-s{seed}"
            lines.append(f"| SFT + RL {a.steps} steps | {name} | {seed} | {ev[run]['accuracy']:.3f} | "
                         f"{c['reward_first_q']:.3f} → {c['reward_last_q']:.3f} | "
                         f"{c['zero_std_first_q']:.2f} → {c['zero_std_last_q']:.2f} | {c['seconds']:.0f} s |")
    for key in ("curated", "uncurated"):
        accs = [ev[f"{key}-s{seed}"]["accuracy"] for seed in a.rl_seeds]
        lines.append(f"| mean over seeds | {key} | | {_mean(accs):.3f} | | | |")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", required=True)
    p.add_argument("--data-dir", required=True, help="folder with train.jsonl / test.jsonl (VLM-R1) and images/")
    p.add_argument("--config", default="recipes/tiny-grpo.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--pool", type=int, default=1500)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--band", default="0,0.75")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--eval-max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.2)
    p.add_argument("--curate-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="curation sampling seed")
    p.add_argument("--retest-seed", type=int, default=1)
    p.add_argument("--rl-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0])
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}

    def save_times() -> None:
        times_path.write_text(json.dumps(times))

    pool = write_pool(Path(a.data_dir), a.pool, out / "pool.jsonl")
    report = curate(a, pool, out / "curate", a.seed, times, "curate")
    curate(a, pool, out / "curate-retest", a.retest_seed, times, "curate_retest")
    save_times()
    kept = out / "curate" / "kept.jsonl"
    runs: dict[str, Path] = {}
    for seed in a.rl_seeds:
        control = uncurated_subset(pool, report["n_kept"], 1000 + seed, out / f"uncurated-s{seed}.jsonl")
        for key, data in (("curated", kept), ("uncurated", control)):
            runs[f"{key}-s{seed}"] = rl(a, data, out / f"rl-{key}-s{seed}", seed, times, f"rl_{key}_s{seed}")
            save_times()
    ev = {"sft": evaluate(a, a.sft, out / "eval-sft.json", times, "eval_sft")}
    for key, ckpt in runs.items():
        ev[key] = evaluate(a, str(ckpt), out / f"eval-{key}.json", times, f"eval_{key}")
        save_times()
    res = {"curate": report, "retest": retest(out / "curate", out / "curate-retest"),
           "eval": {k: {"n": v["n"], "accuracy": v["accuracy"]} for k, v in ev.items()},
           "rl": {k: rl_curve(out / f"rl-{k}") for k in runs}, "times": times, "args": vars(a)}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "RESULTS.md").write_text(markdown(a, res))
    print(markdown(a, res))


if __name__ == "__main__":
    main()
