"""Experiment trackers (`report_to`), read back with each library's own reader: a real 3-step RL run of the tiny
model reports to TensorBoard, W&B (offline) and MLflow (local file store) the same scalars, names and steps as
metrics.jsonl, plus its config and samples.jsonl rows; SFT and curate report too; a resumed run continues its
tracker runs without duplicate steps; trackers close when the run raises; unknown names and missing libraries
fail before the run starts; RL and SFT print one progress line per logged step."""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vlrl import recipes_dir
from vlrl.cli import main as cli_main
from vlrl.config import ConfigError, load_config
from vlrl.train import checkpoint as ckpt
from vlrl.train.dist import DistInfo
from vlrl.train.harness import RunHarness, Schedule
from vlrl.train.logging import read_metrics, scalars_of
from vlrl.train.rl import RLConfig, run_rl

tensorboard = pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
wandb = pytest.importorskip("wandb", reason="the dev extra installs wandb")
mlflow = pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny")

from google.protobuf.message import DecodeError  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
USER_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR", "MLFLOW_TRACKING_URI",
            "MLFLOW_EXPERIMENT_NAME", "TRACKIO_PROJECT")


def _offline_env(mp: pytest.MonkeyPatch, scratch: Path) -> None:
    """No user tracker settings (the defaults under test); W&B's own caches in `scratch`, not the home folder;
    MLflow's file-store opt-in undone after the test."""
    for name in USER_ENV:
        mp.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        mp.setenv(name, str(scratch / name.lower()))
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mp.setenv("WANDB_SILENT", "true")


@pytest.fixture
def offline_env(monkeypatch, tmp_path_factory):
    _offline_env(monkeypatch, tmp_path_factory.mktemp("tracker-home"))


# ---- reading each tracker back with its own library


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def tb_texts(run_dir: Path, tag: str) -> list[tuple[int, str]]:
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    ea.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(f"{tag}/text_summary")]


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file (`run-ID.wandb`): W&B's LevelDB-log framing (a 7-byte file header,
    32 KiB blocks, each chunk `<crc32 u32><length u16><type u8>` then its bytes; type 1 is a whole record, 2/3/4
    its first/middle/last part), each record a `wandb_internal_pb2.Record`."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def finished_records(offline_run: Path, seconds: float = 60.0) -> list[Any]:
    """The records of an offline run's file once W&B's writer has put its `exit` record there (bounded wait): the
    writer is W&B's own service process, which can still be flushing a finished run's file when the test reads it."""
    deadline = time.monotonic() + seconds
    while True:
        (path,) = offline_run.glob("run-*.wandb")
        try:
            records = wandb_records(path)
        except DecodeError:  # a record still being written
            records = []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_history(offline_run: Path) -> dict[int, dict[str, Any]]:
    """step -> the values logged at it (W&B's own `_step`, `_runtime`, `_timestamp` left out)."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in finished_records(offline_run):
        if rec.WhichOneof("record_type") == "history":
            items = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
            rows.setdefault(rec.history.step.num, {}).update({k: v for k, v in items.items() if k[0] != "_"})
    return rows


def wandb_run(offline_run: Path) -> Any:
    """The run record of an offline run: its id, config, ..."""
    runs = [r.run for r in finished_records(offline_run) if r.WhichOneof("record_type") == "run"]
    assert runs, f"no run record in {offline_run}"
    return runs[0]


def wandb_config(offline_run: Path) -> dict[str, Any]:
    return {u.key: json.loads(u.value_json) for u in wandb_run(offline_run).config.update if u.key != "_wandb"}


def mlflow_run(run_dir: Path) -> tuple[MlflowClient, Any]:
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in read_metrics(run_dir / "metrics.jsonl"):
        for k, v in scalars_of(line).items():
            out.setdefault(k, []).append((line["step"], v))
    return out


def samples_by_step(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for row in read_metrics(run_dir / "samples.jsonl"):
        out.setdefault(row["step"], []).append(row)
    return out


# ---- a real RL run


@pytest.fixture(scope="module")
def rl_run(tiny_model_dir, synth_dir, tmp_path_factory) -> tuple[Path, str]:
    """3 RL steps of the tiny model (KL on, so the progress line shows kl) reporting to TensorBoard, W&B and
    MLflow; returns the run directory and what the run printed."""
    out = tmp_path_factory.mktemp("trackers-rl") / "run"
    data = synth_dir / "counting" / "train.jsonl"
    overrides = [f"model={tiny_model_dir}", f"data=[{data}]", f"out={out}", "validation.data=[]", "replay.coef=0",
                 "max_steps=3", "rollout.batch_size=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
                 "rollout.dynamic_sampling=false", "algorithm.beta=0.01", "logging.log_samples=3",
                 "logging.save_every=100", "threads=1", "logging.report_to=[tensorboard, wandb, mlflow]"]
    cfg = load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", overrides)
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _offline_env(mp, out.parent)
        printed: list[str] = []
        mp.setattr("tqdm.tqdm.write", classmethod(lambda cls, s, *a, **k: printed.append(s)))
        try:
            run_rl(cfg)
        finally:
            torch.set_num_threads(before)
    return out, "\n".join(printed)


def _assert_same_curves(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]],
                        rel: float) -> None:
    assert sorted(got) == sorted(want)
    for name, points in want.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=rel, abs=1e-30), name


@pytest.mark.slow
def test_rl_run_reports_to_tensorboard_what_metrics_jsonl_holds(rl_run):
    out, _ = rl_run
    want = jsonl_scalars(out)
    assert {"reward/mean", "kl", "time/step", "elapsed_s", "lr"} <= set(want)
    assert all([s for s, _ in points] == [1, 2, 3] for points in want.values())
    _assert_same_curves(tb_scalars(out), want, rel=1e-6)  # TensorBoard stores float32
    samples = samples_by_step(out)
    texts = tb_texts(out, "samples")
    assert [s for s, _ in texts] == [1, 2, 3]
    for step, text in texts:
        assert text.count("\n") == 1 + len(samples[step])  # header, rule, one line per row
        first = samples[step][0]["completion"].replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        assert first.split("\n")[0] in text
    ((step, config),) = tb_texts(out, "config")
    assert step == 0 and "report_to:" in config and "beta: 0.01" in config


@pytest.mark.slow
def test_rl_run_reports_to_wandb_offline_what_metrics_jsonl_holds(rl_run):
    out, _ = rl_run
    (offline,) = wandb_runs(out)
    assert wandb_run(offline).run_id == json.loads((out / "trackers.json").read_text())["wandb"]
    history = wandb_history(offline)
    got: dict[str, list[tuple[int, float]]] = {}
    for step, row in sorted(history.items()):
        for k, v in row.items():
            if not k.startswith("samples"):
                got.setdefault(k, []).append((step, v))
    _assert_same_curves(got, jsonl_scalars(out), rel=1e-12)
    samples = samples_by_step(out)
    for step in (1, 2, 3):  # each logged step's samples as a wandb.Table
        assert history[step]["samples/_type"] == "table-file"
        table = json.loads((offline / "files" / history[step]["samples/path"]).read_text())
        rows = [dict(zip(table["columns"], r)) for r in table["data"]]
        assert [r["completion"] for r in rows] == [r["completion"] for r in samples[step]]
        assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in samples[step]])
    config = wandb_config(offline)
    assert config["logging"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert config["algorithm"]["beta"] == 0.01


@pytest.mark.slow
def test_rl_run_reports_to_an_mlflow_file_store_what_metrics_jsonl_holds(rl_run, offline_env):
    out, _ = rl_run
    client, run = mlflow_run(out)
    want = jsonl_scalars(out)
    got = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    _assert_same_curves(got, want, rel=1e-12)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.beta"] == "0.01" and run.data.params["max_steps"] == "3"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert "beta: 0.01" in (artifacts / "config.yaml").read_text()
    samples = samples_by_step(out)
    for step in (1, 2, 3):
        table = json.loads((artifacts / "samples" / f"step-{step:06d}.json").read_text())
        assert [dict(zip(table["columns"], r))["completion"] for r in table["data"]] == \
            [r["completion"] for r in samples[step]]


@pytest.mark.slow
def test_rl_prints_one_progress_line_per_logged_step(rl_run):
    _, printed = rl_run
    lines = [ln for ln in printed.splitlines() if ln.startswith("rl/")]
    assert len(lines) == 3
    for step, ln in enumerate(lines, 1):
        assert re.fullmatch(rf"rl/ppo_clip step {step}/3  reward \S+  accuracy \S+  kl \S+  length \S+  "
                            r"\d+\.\d\d s/step", ln), ln


@pytest.mark.slow
def test_sft_reports_to_tensorboard_and_prints_loss_and_lr(tiny_model_dir, synth_dir, tmp_path, offline_env,
                                                           capsys, one_torch_thread):
    from vlrl.train.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")], out=str(out),
                      max_steps=2, batch_size=4, micro_batch_size=4, warmup_steps=0, log_every=1,
                      report_to=["tensorboard"]))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sft/")]
    assert len(lines) == 2
    for step, ln in enumerate(lines, 1):
        assert re.fullmatch(rf"sft/full step {step}/2  loss \S+  lr \S+  \d+\.\d\d s/step", ln), ln
    _assert_same_curves(tb_scalars(out), jsonl_scalars(out), rel=1e-6)
    assert "loss" in tb_scalars(out)


@pytest.mark.slow
def test_curate_reports_to_tensorboard(tiny_model_dir, synth_dir, tmp_path, offline_env, one_torch_thread):
    from vlrl.curate.run import CurateConfig, run_curate

    out = tmp_path / "curate"
    run_curate(CurateConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "test.jsonl")],
                            out=str(out), n=2, limit=4, batch_size=2, max_new_tokens=4, report_to=["tensorboard"]))
    want = jsonl_scalars(out)
    assert {"items_done", "time/generate"} <= set(want)
    _assert_same_curves(tb_scalars(out), want, rel=1e-6)


# ---- the harness's side: resume, failure, errors at start


class NoState:
    def load_state_dict(self, state: dict) -> None:
        pass


def _values(scale: float, fail_at: int | None = None):
    def step_fn(step: int, position: int) -> tuple[dict, list, int]:
        if step + 1 == fail_at:
            raise RuntimeError("step failed")
        return {"loss": scale * (step + 1)}, [{"step": step + 1, "completion": f"c{step + 1}"}], position + 1

    return step_fn


def test_a_resumed_run_continues_its_tracker_runs_without_duplicate_steps(tmp_path, offline_env):
    """Steps 1-4 logged, the checkpoint at 2, the run dies; the resumed run logs 3-4 again with new values."""
    sched = Schedule(4, None, save_every=0, keep_checkpoints=0, log_every=1, eval_every=0)
    names = ["tensorboard", "wandb", "mlflow"]
    first = RunHarness(tmp_path, INFO, sched, row_log=True, report_to=names, config=sched)
    first.loop(0, 0, _values(1.0), save=None, validate=None, desc="t", postfix="loss")
    resumed = RunHarness(tmp_path, INFO, sched, row_log=True, report_to=names, config=sched)
    state = {"optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state(), "step": 2, "position": 2}
    assert resumed.restore(state, NoState(), NoState()) == (2, 2)
    resumed.loop(2, 2, _values(10.0), save=None, validate=None, desc="t", postfix="loss")
    want = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert jsonl_scalars(tmp_path)["loss"] == want
    assert tb_scalars(tmp_path)["loss"] == want  # purge_step hid the first run's steps 3 and 4
    client, run = mlflow_run(tmp_path)  # one run; steps it has are not sent again (the first values stay)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    a, b = wandb_runs(tmp_path)  # one offline segment per invocation, one run id (`wandb sync` joins them)
    assert wandb_run(a).run_id == wandb_run(b).run_id == json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    assert [(s, r["loss"]) for s, r in sorted(wandb_history(b).items())] == [(3, 30.0), (4, 40.0)]


def test_trackers_close_and_flush_when_the_run_raises(tmp_path, offline_env):
    sched = Schedule(4, None, save_every=0, keep_checkpoints=0, log_every=1, eval_every=0)
    harness = RunHarness(tmp_path, INFO, sched, report_to=["tensorboard", "mlflow"])
    with pytest.raises(RuntimeError, match="step failed"):
        harness.loop(0, 0, _values(1.0, fail_at=3), save=None, validate=None, desc="t", postfix="loss")
    assert tb_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0)]
    _, run = mlflow_run(tmp_path)
    assert run.info.status == "FAILED"


def test_unknown_tracker_names_fail_with_the_valid_ones(tmp_path):
    sched = Schedule(1, None, 0, 0, 1, 0)
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'; valid: tensorboard, wandb, mlflow, "
                                          r"trackio, none"):
        RunHarness(tmp_path, INFO, sched, report_to=["tensorbord"])
    with pytest.raises(ConfigError, match="`none` together with trackers"):
        RunHarness(tmp_path, INFO, sched, report_to=["none", "wandb"])
    assert not RunHarness(tmp_path, INFO, sched, report_to=["none"]).trackers


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                          ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_a_missing_library_fails_with_its_install_command(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` then raises: ImportError
    with pytest.raises(ConfigError, match=re.escape(f"install it with: pip install 'vlrl[{name}]'")):
        RunHarness(tmp_path, INFO, Schedule(1, None, 0, 0, 1, 0), report_to=[name])


def test_rl_and_curate_fail_on_report_to_before_loading_anything(tmp_path, monkeypatch, capsys):
    """The model and data paths do not exist: the tracker error comes first."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    missing = tmp_path / "missing"
    code = cli_main(["rl", f"model={missing}", f"data=[{missing}.jsonl]", f"out={tmp_path / 'rl'}",
                     "logging.report_to=[wandb]"])
    assert code == 2
    assert "config error: report_to: wandb needs a library that is not installed" in capsys.readouterr().err
    code = cli_main(["curate", f"model={missing}", f"data=[{missing}.jsonl]", f"out={tmp_path / 'c'}",
                     "report_to=[tensorboard, nope]"])
    assert code == 2
    assert "report_to: unknown tracker 'nope'" in capsys.readouterr().err


class FakeTrackio:
    """Stands in for the `trackio` module (it cannot install beside the pinned packages): records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def init(self, **kw: Any) -> FakeTrackio:
        self.calls.append(("init", kw))
        return self

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.calls.append(("log", step, metrics))

    def finish(self) -> None:
        self.calls.append(("finish",))

    class Table:
        def __init__(self, columns: list, data: list) -> None:
            self.rows = [dict(zip(columns, r)) for r in data]


def test_trackio_gets_the_config_the_scalars_by_step_and_a_table(tmp_path, monkeypatch, offline_env):
    fake = FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    sched = Schedule(2, None, 0, 0, 1, 0)
    harness = RunHarness(tmp_path / "run", INFO, sched, row_log=True, report_to=["trackio"], config=sched)
    harness.loop(0, 0, _values(1.0), save=None, validate=None, desc="t", postfix="loss")
    init, *logs, finish = fake.calls
    name = json.loads((tmp_path / "run" / "trackers.json").read_text())["trackio"]
    assert init == ("init", {"project": "vlrl", "name": name, "config": {**sched.__dict__}, "resume": "allow"})
    assert name.startswith("run-") and finish == ("finish",)
    assert [(c[1], c[2]["loss"]) for c in logs if "loss" in c[2]] == [(1, 1.0), (2, 2.0)]
    assert [(c[1], c[2]["samples"].rows) for c in logs if "samples" in c[2]] == \
        [(1, [{"step": 1, "completion": "c1"}]), (2, [{"step": 2, "completion": "c2"}])]
