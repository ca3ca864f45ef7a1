"""`vlrl curate` on the tiny model: statistics equal a recomputation from the saved samples, the kept set obeys
the band and keeps the input's fields, seeds follow the item id, an interrupted run resumes without sampling
the finished items again, a run stopped by its time budget leaves a consistent partial state that a re-run
completes, metrics.jsonl has one line per batch, the CLI end to end (and its exit code 2 on missing files),
torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlrl.config import ConfigError
from vlrl.curate import run as curate_run
from vlrl.curate.run import CurateConfig, item_seed, run_curate
from vlrl.data.formats import read_file
from vlrl.rewards.registry import RewardSpec, register_reward

N = 4


@register_reward("curate_test_parity", cheap=True)
def parity_reward(completions, samples, **kwargs):
    """1 when the completion text has an even number of characters: varies on a random model's output."""
    return [float(len(c) % 2 == 0) for c in completions]


def _recompute(text: str) -> float:  # the oracle, written independently of the reward above
    return 1.0 if len(text) % 2 == 0 else 0.0


def _cfg(model: Path, data: Path, out: Path, **kw: object) -> CurateConfig:
    base: dict = dict(model=str(model), data=[str(data)], out=str(out), n=N, band=[0.3, 0.7], limit=12,
                      max_new_tokens=6, rewards=[RewardSpec("curate_test_parity")], batch_size=4, seed=3)
    base.update(kw)
    return CurateConfig(**base)


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class CountingEngine:
    """Wraps the real engine; records the ids of every prompt sampled (greedy calls included)."""

    def __init__(self, inner):
        self.inner = inner
        self.sampled: list[str] = []
        self.greedy: list[str] = []

    def generate(self, prompts, n, sampling, *, seeds=None):
        (self.greedy if sampling.greedy else self.sampled).extend(p.id for p in prompts)
        return self.inner.generate(prompts, n, sampling, seeds=seeds)

    def sync_weights(self, model):
        self.inner.sync_weights(model)


@pytest.fixture
def counting_engines(monkeypatch):
    made: list[CountingEngine] = []
    real = curate_run.make_engine

    def make(name, model, processor, **kw):
        made.append(CountingEngine(real(name, model, processor, **kw)))
        return made[-1]

    monkeypatch.setattr(curate_run, "make_engine", make)
    return made


@pytest.fixture(scope="module")
def reference(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    """One full run over 12 counting items (batch_size 1 so any resumed run has the same batch shapes)."""
    out = tmp_path_factory.mktemp("curate-ref")
    run_curate(_cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", out, batch_size=1, parquet=True))
    return out


def test_stats_equal_recomputation_from_samples_and_kept_obeys_band(reference, synth_dir):
    samples = _lines(reference / "samples.jsonl")
    stats = {r["id"]: r for r in _lines(reference / "stats.jsonl")}
    inputs = _lines(synth_dir / "counting" / "train.jsonl")[:12]
    assert [r["id"] for r in samples] == [r["id"] for r in inputs] == list(stats)
    for rec in samples:
        texts = [s["text"] for s in rec["samples"]]
        rewards = [_recompute(t) for t in texts]
        assert len(texts) == N and [s["reward"] for s in rec["samples"]] == rewards
        st = stats[rec["id"]]
        assert st["mean"] == pytest.approx(sum(rewards) / N) and st["n_pass"] == sum(rewards)
        assert st["pass_rate"] == pytest.approx(sum(rewards) / N)
        assert (st["min"], st["max"]) == (min(rewards), max(rewards))
        assert st["pass_at_n"] == float(max(rewards) == 1.0)
        assert st["pass_at_1"] == _recompute(rec["greedy"]["text"])
        assert st["gap"] == st["pass_at_n"] - st["pass_at_1"]
        assert st["kept"] == (0.3 < st["mean"] < 0.7 and st["min"] < st["max"])
    kept_ids = [i for i, st in stats.items() if st["kept"]]
    assert 0 < len(kept_ids) < 12  # the band really separated something (not a vacuous check)
    report = json.loads((reference / "report.json").read_text())
    assert report["n_items"] == 12 and report["n_kept"] == len(kept_ids)
    assert sum(report["pass_histogram"].values()) == 12
    assert report["pass_histogram"][f"2/{N}"] == sum(st["n_pass"] == 2 for st in stats.values())


def test_kept_records_keep_the_input_fields(reference, synth_dir):
    inputs = {r["id"]: r for r in _lines(synth_dir / "counting" / "train.jsonl")}
    kept = _lines(reference / "kept.jsonl")
    stats = {r["id"]: r for r in _lines(reference / "stats.jsonl")}
    assert [r["id"] for r in kept] == [i for i, st in stats.items() if st["kept"]]
    for rec in kept:
        src = inputs[rec["id"]]
        assert set(rec) == set(src) | {"curate"}
        assert rec["image"] == str(synth_dir / "counting" / src["image"])  # made absolute
        assert {k: v for k, v in rec.items() if k not in ("image", "curate")} == \
            {k: v for k, v in src.items() if k != "image"}
        assert rec["curate"]["mean"] == stats[rec["id"]]["mean"]
    for path in (reference / "kept.jsonl", reference / "kept.parquet"):  # both read back as datasets
        back = read_file(path).samples
        assert [s.id for s in back] == [r["id"] for r in kept]
        assert [s.answer for s in back] == [inputs[r["id"]]["answer"] for r in kept]


def test_seeds_follow_the_item_id_not_its_position(reference, tiny_model_dir, synth_dir, tmp_path):
    assert item_seed(3, "a") == item_seed(3, "a") != item_seed(3, "b") and item_seed(4, "a") != item_seed(3, "a")
    rev = tmp_path / "reversed.jsonl"
    lines = (synth_dir / "counting" / "train.jsonl").read_text().splitlines()[:12]
    rev.write_text("".join(ln + "\n" for ln in reversed(lines)))
    shutil.copytree(synth_dir / "counting" / "images", tmp_path / "images")
    run_curate(_cfg(tiny_model_dir, rev, tmp_path / "out", batch_size=1))
    a = {r["id"]: r["samples"] for r in _lines(reference / "samples.jsonl")}
    b = {r["id"]: r["samples"] for r in _lines(tmp_path / "out" / "samples.jsonl")}
    assert [r["id"] for r in _lines(tmp_path / "out" / "samples.jsonl")] == list(reversed(list(a)))
    assert a == b


def test_rerun_after_torn_write_samples_only_the_rest(reference, tiny_model_dir, synth_dir, tmp_path,
                                                        counting_engines):
    out = tmp_path / "run"
    out.mkdir()
    ref_lines = (reference / "samples.jsonl").read_text().splitlines()
    done = ref_lines[:5]
    (out / "samples.part-0.jsonl").write_text("".join(ln + "\n" for ln in done) + ref_lines[5][:40])
    shutil.copy(reference / "config.yaml", out / "config.yaml")
    cfg = _cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", out, batch_size=1, parquet=True)
    report = run_curate(cfg)
    ids = [json.loads(ln)["id"] for ln in ref_lines]
    (engine,) = counting_engines
    assert engine.sampled == ids[5:] and engine.greedy == ids[5:]  # the torn item 6 is sampled again
    merged = (out / "samples.jsonl").read_text().splitlines()
    assert merged[:5] == done  # finished rows untouched, byte for byte
    assert merged == ref_lines  # and the rest equals the uninterrupted run (same seeds, same batch shapes)
    assert report["items_sampled_this_run"] == 7
    assert (out / "kept.jsonl").read_text() == (reference / "kept.jsonl").read_text()
    # finished: a re-run with another band re-filters without building an engine
    report = run_curate(_cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", out, batch_size=1,
                             band="0,1", rank_by_gap=True, max_keep=3))
    assert len(counting_engines) == 1 and report["items_sampled_this_run"] == 0
    stats = {r["id"]: r for r in _lines(out / "stats.jsonl")}
    kept = [r["id"] for r in _lines(out / "kept.jsonl")]
    band = [i for i, st in stats.items() if 0 < st["mean"] < 1 and st["min"] < st["max"]]
    assert kept == sorted(band, key=lambda i: -stats[i]["gap"])[:3]
    with pytest.raises(ConfigError, match="n: 4 -> 3"):  # other sampling settings: refused
        run_curate(_cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", out, n=3))


TIMES = ("time/generate", "time/score", "elapsed_s")


def _untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMES} for m in lines]


def test_time_budget_stops_after_the_first_batch_and_a_rerun_completes(reference, tiny_model_dir, synth_dir,
                                                                      tmp_path, counting_engines):
    data = synth_dir / "counting" / "train.jsonl"
    out = tmp_path / "run"
    out.mkdir()
    (out / "kept.jsonl").write_text('{"id": "from an earlier run on other data"}\n')
    ref_lines = (reference / "samples.jsonl").read_text().splitlines()
    ids = [json.loads(ln)["id"] for ln in ref_lines]
    budget = _cfg(tiny_model_dir, data, out, batch_size=1, parquet=True, max_seconds=1e-6)
    assert run_curate(budget) == {}  # not finished: no report to print
    assert counting_engines[0].sampled == ids[:1] and counting_engines[0].greedy == ids[:1]
    # the partial state: the finished item merged, no part file, nothing derived from the whole item set
    assert (out / "samples.jsonl").read_text().splitlines() == ref_lines[:1]
    assert not list(out.glob("samples.part-*")) and not (out / "kept.jsonl").exists()
    assert not (out / "stats.jsonl").exists()
    partial = json.loads((out / "report.json").read_text())
    assert (partial["complete"], partial["items_done"], partial["items_total"]) == (False, 1, 12)
    assert partial["items_sampled_this_run"] == 1 and partial["max_seconds"] == 1e-6
    ref_metrics = _lines(reference / "metrics.jsonl")
    assert _untimed(_lines(out / "metrics.jsonl")) == _untimed(ref_metrics[:1])

    report = run_curate(_cfg(tiny_model_dir, data, out, batch_size=1, parquet=True))
    assert counting_engines[1].sampled == ids[1:] and counting_engines[1].greedy == ids[1:]
    assert report["complete"] is True and report["items_sampled_this_run"] == 11
    for name in ("samples.jsonl", "stats.jsonl", "kept.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text(), name
    assert report["n_kept"] == json.loads((reference / "report.json").read_text())["n_kept"]
    metrics = _lines(out / "metrics.jsonl")  # numbered on from the first run; running means as uninterrupted
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert _untimed(metrics) == _untimed(ref_metrics)


def test_metrics_has_one_line_per_batch(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "m"
    cfg = _cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", out, limit=6, batch_size=4)
    report = run_curate(cfg)
    metrics = _lines(out / "metrics.jsonl")
    assert [list(m) for m in metrics] == [["step", "items_done", "items_total", "mean_reward", "mean_pass_rate",
                                           "time/generate", "time/score", "elapsed_s"]] * 2
    assert [(m["step"], m["items_done"], m["items_total"]) for m in metrics] == [(1, 4, 6), (2, 6, 6)]
    samples = _lines(out / "samples.jsonl")
    for m, k in zip(metrics, (4, 6)):  # running means over the first k items, recomputed from the samples
        means = [sum(_recompute(s["text"]) for s in r["samples"]) / N for r in samples[:k]]
        assert m["mean_reward"] == pytest.approx(sum(means) / k)
        assert m["mean_pass_rate"] == pytest.approx(sum(means) / k)  # 0/1 rewards: passing is scoring 1
    assert metrics[-1]["mean_reward"] == pytest.approx(report["mean_reward"])
    assert metrics[-1]["mean_pass_rate"] == pytest.approx(report["mean_pass_rate"])
    for m in metrics:
        assert m["time/generate"] > 0 and m["time/score"] > 0
    assert metrics[0]["elapsed_s"] >= metrics[0]["time/generate"] + metrics[0]["time/score"]
    assert metrics[1]["elapsed_s"] >= metrics[0]["elapsed_s"] + metrics[1]["time/generate"]
    run_curate(cfg)  # finished: re-filtering samples nothing and logs no batch
    assert _lines(out / "metrics.jsonl") == metrics


def _vlrl_all(*commands: list[str], torchrun: int = 0) -> list[subprocess.CompletedProcess]:
    """Independent `vlrl` commands side by side (each mostly pays its imports, on its own core); `torchrun`: launch
    the last one on that many ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"]
    procs = [subprocess.Popen([*(launch if torchrun and i == len(commands) - 1 else [sys.executable]), "-m",
                               "vlrl.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, args in enumerate(commands)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_cli_end_to_end_and_missing_files(tiny_model_dir, synth_dir, tmp_path):
    data = str(synth_dir / "chart" / "train.jsonl")
    missing = tmp_path / "nope.jsonl"
    proc, nodata, nomodel, badband = _vlrl_all(
        ["curate", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "c"), "--n", "2", "--band",
         "0,0.6", "--reward", "accuracy", "--reward", "format", "--rank-by-gap", "--max-keep", "3", "--parquet",
         "limit=5", "max_new_tokens=4", "threads=1", "template=fast"],
        ["curate", "--model", str(tiny_model_dir), "--data", str(missing), "--out", str(tmp_path / "m1")],
        ["curate", "--model", str(tmp_path / "no-model"), "--data", data, "--out", str(tmp_path / "m2"), "limit=2"],
        ["curate", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "m3"), "--band", "0.6,0.1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pass-rate histogram" in proc.stdout and "items 5" in proc.stdout
    cfg = (tmp_path / "c" / "config.yaml").read_text()
    assert "name: format" in cfg and "- 0.6" in cfg and "template: fast" in cfg
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["n_items"] == 5 and report["band"] == [0.0, 0.6] and report["max_keep"] == 3
    assert sum(report["pass_histogram"].values()) == 5 and set(report["pass_histogram"]) == {"0/2", "1/2", "2/2"}
    assert (tmp_path / "c" / "kept.parquet").exists() and len(_lines(tmp_path / "c" / "samples.jsonl")) == 5
    assert nodata.returncode == 2 and f"data error: {missing}" in nodata.stderr
    assert "no such data file" in nodata.stderr and "Traceback" not in nodata.stderr
    assert nomodel.returncode == 2 and "not a model folder" in nomodel.stderr and "Traceback" not in nomodel.stderr
    assert badband.returncode == 2 and "band" in badband.stderr


@pytest.mark.slow
def test_sigkill_then_rerun_skips_finished_items(tiny_model_dir, synth_dir, tmp_path, counting_engines):
    data = synth_dir / "counting" / "train.jsonl"  # the first 20 items, one per engine call
    out = tmp_path / "k"
    args = ["curate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--n", "4",
            "batch_size=1", "max_new_tokens=6", "threads=1", "seed=3", "limit=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = out / "samples.part-0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raw = part.read_bytes()
    finished = raw[: raw.rfind(b"\n") + 1].decode().splitlines()
    done = [json.loads(ln)["id"] for ln in finished]
    assert 3 <= len(done) < 20, "the run was not interrupted mid-way"
    run_curate(CurateConfig(model=str(tiny_model_dir), data=[str(data)], out=str(out), n=4, batch_size=1,
                            max_new_tokens=6, seed=3, limit=20))
    (engine,) = counting_engines
    all_ids = [r["id"] for r in _lines(data)][:20]
    assert engine.sampled == [i for i in all_ids if i not in done]
    merged = (out / "samples.jsonl").read_text().splitlines()
    assert merged[: len(finished)] == finished and [json.loads(ln)["id"] for ln in merged] == all_ids


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_writes(tiny_model_dir, synth_dir, tmp_path):
    args = ["curate", "--model", str(tiny_model_dir), "--data", str(synth_dir / "compare" / "train.jsonl"),
            "n=3", "limit=10", "batch_size=1", "max_new_tokens=4", "threads=1", "--reward", "format_lenient"]
    one, two = _vlrl_all([*args, "--out", str(tmp_path / "one")], [*args, "--out", str(tmp_path / "two")], torchrun=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    for name in ("samples.jsonl", "stats.jsonl", "kept.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["items_sampled_rank0"] == 5 and report["n_items"] == 10


def test_vllm_settings_are_checked_and_only_the_sampling_ones_are_fixed_on_resume(tmp_path):
    from vlrl.curate.run import check_resumable
    from vlrl.rollout.vllm_engine import VLLMConfig
    from vlrl.train.rundir import write_config

    base = dict(model="m", data=["d"], out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="vllm.python: no vLLM environment"):
        CurateConfig(**base, rollout_engine="vllm", vllm=VLLMConfig(python=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="vllm.retries must be >= 0"):
        CurateConfig(**base, vllm=VLLMConfig(retries=-1))
    server = VLLMConfig(url="http://127.0.0.1:8100")
    cfg = CurateConfig(**base, rollout_engine="vllm", vllm=server)
    out = Path(cfg.out)
    out.mkdir()
    write_config(out, cfg, [], [])
    moved = VLLMConfig(url="http://10.0.0.2:8100", request_timeout=30.0, retries=0)
    changes = check_resumable(CurateConfig(**base, rollout_engine="vllm", vllm=moved), out, True)
    assert {c.key for c in changes} == {"vllm.url", "vllm.request_timeout", "vllm.retries"}
    for other in (VLLMConfig(url=server.url, dtype="bfloat16"), VLLMConfig(url=server.url, max_model_len=64)):
        with pytest.raises(ConfigError, match="holds samples drawn with other settings"):
            check_resumable(CurateConfig(**base, rollout_engine="vllm", vllm=other), out, True)


def test_engine_vllm_gets_its_settings_and_is_closed_when_sampling_ends(tiny_model_dir, synth_dir, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    from vlrl.rollout.vllm_engine import VLLMConfig

    made: list = []
    real = curate_run.make_engine

    class Closing(CountingEngine):
        closed = 0

        def close(self):
            self.closed += 1

    def make(name, model, processor, **kw):
        made.append((name, kw, Closing(real("hf", model, processor, device=kw["device"]))))
        return made[-1][2]

    monkeypatch.setattr(curate_run, "make_engine", make)
    server = VLLMConfig(url="http://127.0.0.1:8100", retries=0)
    run_curate(_cfg(tiny_model_dir, synth_dir / "counting" / "train.jsonl", tmp_path / "run", limit=4,
                    rollout_engine="vllm", vllm=server))
    ((name, kw, engine),) = made
    assert name == "vllm" and kw["config"] == server and engine.closed == 1 and len(engine.sampled) == 4
