"""Run-directory safety (issue 18 findings 1, 2, 3, 11): a checkpoint's trainer state loads without running its
pickle's code; one run at a time holds a run directory; a resume with another config is refused naming each key;
a torn last metrics line is dropped on resume."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlrl.config import ConfigError
from vlrl.train import checkpoint as ckpt
from vlrl.train.dist import DistInfo
from vlrl.train.harness import RunHarness, Schedule

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _NoFiles:
    """A model / processor stand-in whose save writes nothing (the trainer state is what these tests read)."""

    def save_pretrained(self, folder: Path) -> None:
        pass


class _Evil:
    """Unpickling this runs `touch <marker>`: what a hostile trainer_state.pt carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


# --- finding 1: code execution on resume ------------------------------------------------------------------


def test_a_trainer_state_whose_pickle_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "run" / "checkpoints" / "step-1"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "position": 0, "x": _Evil(marker)}, folder / ckpt.STATE_FILE)
    harness = RunHarness(tmp_path / "run", INFO, Schedule(2, None, 1, 0, 1, 0))
    with pytest.raises(ConfigError, match=r"trainer_state\.pt.*refus"):
        harness.resume_point("start-model")
    assert not marker.exists()


def test_trainer_state_round_trips_rng_states_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # numpy's cached gaussian is part of its state
    state = {"step": 2, "position": 16, "rng": ckpt.rng_state(), "extra": {"epoch": 1, "buffer": [[0, 1]]}}
    ahead = (random.random(), np.random.standard_normal(), torch.rand(3))
    ckpt.save_checkpoint(tmp_path, 2, _NoFiles(), _NoFiles(), state)
    loaded = ckpt.load_state(ckpt.latest_checkpoint(tmp_path))
    ckpt.set_rng_state(loaded["rng"])
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert ahead[:2] == again[:2] and torch.equal(ahead[2], again[2])
    assert loaded["extra"] == {"epoch": 1, "buffer": [[0, 1]]} and loaded["position"] == 16


# --- finding 2: two runs, one out ---------------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from vlrl.train.rundir import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]), command="holder-command --out x")
print("locked", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    """A process that holds `out`'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _sft_cfg(model: Path | str, data: Path, out: Path, **kw: Any) -> Any:
    from vlrl.train.sft import SFTConfig

    base: dict[str, Any] = dict(model=str(model), data=[str(data / "counting" / "train.jsonl")], out=str(out),
                                max_steps=1, batch_size=4, micro_batch_size=4, warmup_steps=0, save_every=1,
                                log_every=1, threads=1)
    return SFTConfig(**{**base, **kw})


def test_a_second_lock_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    from vlrl.train.rundir import lock_run_dir

    with lock_run_dir(tmp_path / "run", command="first --run"):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on .*first --run"):
            lock_run_dir(tmp_path / "run", command="second")
    with lock_run_dir(tmp_path / "run", command="third"):  # released: free again
        pass


@pytest.mark.slow
def test_sft_rl_and_curate_refuse_a_run_dir_another_process_holds_before_loading_anything(tmp_path, synth_dir,
                                                                                           tiny_model_dir):
    from vlrl.curate.run import CurateConfig, run_curate
    from vlrl.train.rl import run_rl
    from vlrl.train.rl_config import RLConfig

    out = tmp_path / "run"
    holder = _holder(out)
    try:
        model, data = str(tiny_model_dir), [str(synth_dir / "counting" / "train.jsonl")]
        for run, cfg in ((run_rl, RLConfig(model=model, data=data, out=str(out), max_steps=1, threads=1)),
                         (run_curate, CurateConfig(model=model, data=data, out=str(out), limit=1, threads=1)),
                         (lambda c: __import__("vlrl.train.sft", fromlist=["run_sft"]).run_sft(c),
                          _sft_cfg(model, synth_dir, out))):  # fmt: skip
            with pytest.raises(ConfigError, match=rf"pid {holder.pid} on .*holder-command --out x"):
                run(cfg)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    from vlrl.train.rundir import lock_run_dir

    lock_run_dir(out).release()  # a SIGKILLed holder leaves no stale lock


@pytest.mark.slow
def test_cli_refuses_a_held_run_dir_with_exit_2(tmp_path, synth_dir, tiny_model_dir):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-m", "vlrl.cli", "rl", f"model={tiny_model_dir}", f"out={out}",
                              f"data=[{synth_dir / 'counting' / 'train.jsonl'}]", "max_steps=1", "threads=1"],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"in use by another run (pid {holder.pid}" in run.stderr and "Traceback" not in run.stderr


# --- finding 11: a torn metrics.jsonl -------------------------------------------------------------------------


def test_resume_drops_a_torn_last_line_of_metrics_and_samples_and_goes_on(tmp_path):
    from vlrl.train.logging import read_metrics

    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(whole + '{"step": 4, "lo')  # cut by a kill
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "row": 0}\n{"step": 2, "ro')
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    harness = RunHarness(tmp_path, INFO, Schedule(4, None, 0, 0, 1, 0), row_log=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = {"optimizer": opt.state_dict(), "scheduler": {}, "rng": ckpt.rng_state(), "step": 2, "position": 0}

    class _Sched:
        def load_state_dict(self, d: dict) -> None:
            pass

    assert harness.restore(state, opt, _Sched()) == (2, 0)
    harness.metrics.log({"step": 3, "loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
                                                        {"step": 3, "loss": 0.5}]  # fmt: skip
    assert read_metrics(tmp_path / "samples.jsonl") == [{"step": 1, "row": 0}]


def test_a_corrupt_line_inside_metrics_is_a_data_error_naming_its_line(tmp_path):
    from vlrl.data.errors import DataError
    from vlrl.train.logging import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    with pytest.raises(DataError, match=r"metrics\.jsonl:2"):
        MetricsLogger(path).truncate_after(1)


# --- finding 3: resume with a different config ----------------------------------------------------------------


def _rl(out: Path, **kw: Any) -> Any:
    from vlrl.config import build
    from vlrl.train.rl_config import RLConfig

    return build(RLConfig, {"model": "models/a", "data": ["d.jsonl"], "out": str(out), **kw})


def _history(out: Path) -> list[dict[str, Any]]:
    from vlrl.train.logging import read_metrics

    return read_metrics(out / "config.history.jsonl")


def test_resume_with_other_model_or_shapes_is_refused_naming_each_key_and_the_saved_config_is_kept(tmp_path):
    from vlrl.train.rundir import RL_FREE_KEYS, record_run_config

    out = tmp_path / "run"
    out.mkdir()
    record_run_config(out, _rl(out), INFO, RL_FREE_KEYS, resuming=False)
    saved = (out / "config.yaml").read_bytes()
    other = _rl(out, model="models/b", rollout={"group_size": 4}, algorithm={"loss": "gspo"}, max_steps=200)
    with pytest.raises(ConfigError) as err:
        record_run_config(out, other, INFO, RL_FREE_KEYS, resuming=True)
    msg = str(err.value)
    assert "model: 'models/a' -> 'models/b'" in msg and "rollout.group_size: 8 -> 4" in msg
    assert "algorithm.loss: 'ppo_clip' -> 'gspo'" in msg and "max_steps" not in msg and "resume_changes=allow" in msg
    assert (out / "config.yaml").read_bytes() == saved and not (out / "config.history.jsonl").exists()


def test_resume_may_extend_and_observe_a_run_and_the_changes_are_recorded(tmp_path):
    from vlrl.config import load_config
    from vlrl.train.rl_config import RLConfig
    from vlrl.train.rundir import RL_FREE_KEYS, record_run_config

    out = tmp_path / "run"
    out.mkdir()
    record_run_config(out, _rl(out), INFO, RL_FREE_KEYS, resuming=False)
    longer = _rl(out, max_steps=300, logging={"log_every": 5, "report_to": ["tensorboard"]}, threads=2,
                 logprob_chunk_tokens=512)
    record_run_config(out, longer, INFO, RL_FREE_KEYS, resuming=True)
    assert load_config(RLConfig, out / "config.yaml") == longer
    (line,) = _history(out)
    assert line["changes"] == {"max_steps": {"old": 100, "new": 300}, "logging.log_every": {"old": 1, "new": 5},
                               "logging.report_to": {"old": [], "new": ["tensorboard"]},
                               "threads": {"old": 0, "new": 2},
                               "logprob_chunk_tokens": {"old": 2048, "new": 512}} and line["forced"] == []  # fmt: skip
    forced = _rl(out, model="models/b", max_steps=300, resume_changes="allow")
    record_run_config(out, forced, INFO, RL_FREE_KEYS, resuming=True)
    assert _history(out)[-1]["forced"] == ["model"]
    assert _history(out)[-1]["changes"]["model"] == {"old": "models/a", "new": "models/b"}


@pytest.mark.slow
def test_sft_refuses_to_resume_with_another_seed_before_loading_and_resumes_a_longer_run(tmp_path, synth_dir,
                                                                                         tiny_model_dir):  # fmt: skip
    from vlrl.train.checkpoint import list_checkpoints
    from vlrl.train.sft import run_sft

    out = tmp_path / "run"
    run_sft(_sft_cfg(tiny_model_dir, synth_dir, out))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        run_sft(_sft_cfg(tiny_model_dir, synth_dir, out, seed=1, max_steps=2))
    assert [p.name for p in list_checkpoints(out)] == ["step-1"]
    run_sft(_sft_cfg(tiny_model_dir, synth_dir, out, max_steps=2))
    assert [p.name for p in list_checkpoints(out)] == ["step-1", "step-2"]
    assert _history(out)[-1]["changes"] == {"max_steps": {"old": 1, "new": 2}}


def test_config_changes_name_dotted_keys_inside_sections_and_mappings():
    from vlrl.train.rundir import config_changes

    old = {"model": "a", "algorithm": {"loss": "x", "advantage_kwargs": {}}, "rewards": [{"name": "accuracy"}]}
    new = {"model": "a", "algorithm": {"loss": "x", "advantage_kwargs": {"scale": "batch"}}, "rewards": []}
    assert [str(c) for c in config_changes(old, new)] == [
        "algorithm.advantage_kwargs.scale: '<absent>' -> 'batch'", "rewards: [{'name': 'accuracy'}] -> []"]


def test_resume_may_move_the_vllm_worker_but_not_change_the_engine_or_its_precision(tmp_path):
    from vlrl.train.rundir import RL_FREE_KEYS, record_run_config

    out = tmp_path / "run"
    out.mkdir()
    url = "http://127.0.0.1:8100"
    record_run_config(out, _rl(out, rollout={"engine": "vllm", "vllm": {"url": url}}), INFO, RL_FREE_KEYS,
                      resuming=False)
    moved = {"url": "http://10.0.0.2:8100", "request_timeout": 60.0, "startup_timeout": 30.0, "retries": 0,
             "python": "/opt/vllm/bin/python", "gpu_memory_utilization": 0.5, "max_images": 2, "token_env": "T"}
    record_run_config(out, _rl(out, rollout={"engine": "vllm", "vllm": moved}), INFO, RL_FREE_KEYS, resuming=True)
    assert set(_history(out)[-1]["changes"]) == {f"rollout.vllm.{k}" for k in moved}
    for rollout, key in (({"engine": "hf", "vllm": moved}, "rollout.engine: 'vllm' -> 'hf'"),
                         ({"engine": "vllm", "vllm": {**moved, "dtype": "bfloat16"}}, "rollout.vllm.dtype"),
                         ({"engine": "vllm", "vllm": {**moved, "max_model_len": 64}}, "rollout.vllm.max_model_len")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            record_run_config(out, _rl(out, rollout=rollout), INFO, RL_FREE_KEYS, resuming=True)


def _drop_from_saved(out: Path, *dotted: str) -> None:
    """Delete keys from out/config.yaml, as a run folder written before they existed holds it."""
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key in dotted:
        *sections, name = key.split(".")
        node = saved
        for s in sections:
            node = node[s]
        del node[name]
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def test_a_run_folder_from_before_a_key_existed_resumes_when_the_key_holds_its_default(tmp_path):
    """An RL run folder saved before `rollout.engine` and `rollout.vllm` existed (and an SFT one without `seed`)
    resumes with those keys at their defaults: nothing is refused and nothing is recorded as changed."""
    from vlrl.train.rundir import RL_FREE_KEYS, SFT_FREE_KEYS, record_run_config

    out = tmp_path / "run"
    out.mkdir()
    record_run_config(out, _rl(out), INFO, RL_FREE_KEYS, resuming=False)
    _drop_from_saved(out, "rollout.vllm", "rollout.engine")
    record_run_config(out, _rl(out, max_steps=300), INFO, RL_FREE_KEYS, resuming=True)
    assert _history(out)[-1]["changes"] == {"max_steps": {"old": 100, "new": 300}}
    assert "vllm" in (out / "config.yaml").read_text()  # the resumed run's config.yaml holds every key

    sft_out = tmp_path / "sft"
    sft_out.mkdir()
    record_run_config(sft_out, _sft_cfg("models/a", tmp_path, sft_out), INFO, SFT_FREE_KEYS, resuming=False)
    _drop_from_saved(sft_out, "seed")
    record_run_config(sft_out, _sft_cfg("models/a", tmp_path, sft_out), INFO, SFT_FREE_KEYS, resuming=True)
    assert not (sft_out / "config.history.jsonl").exists()
    _drop_from_saved(sft_out, "seed")
    with pytest.raises(ConfigError, match=re.escape("seed: '<absent>' -> 1")):
        record_run_config(sft_out, _sft_cfg("models/a", tmp_path, sft_out, seed=1), INFO, SFT_FREE_KEYS,
                          resuming=True)


def test_a_key_missing_from_an_old_run_folder_is_a_change_when_it_is_set_to_another_value(tmp_path):
    from vlrl.train.rundir import RL_FREE_KEYS, record_run_config

    out = tmp_path / "run"
    out.mkdir()
    record_run_config(out, _rl(out), INFO, RL_FREE_KEYS, resuming=False)
    _drop_from_saved(out, "rollout.vllm")
    with pytest.raises(ConfigError, match=re.escape("rollout.vllm.dtype: '<absent>' -> 'bfloat16'")):
        record_run_config(out, _rl(out, rollout={"vllm": {"dtype": "bfloat16"}}), INFO, RL_FREE_KEYS, resuming=True)
    url = "http://127.0.0.1:8100"  # a free key: the resume goes on, and the history says what it was set to
    record_run_config(out, _rl(out, rollout={"vllm": {"url": url}}), INFO, RL_FREE_KEYS, resuming=True)
    assert _history(out)[-1]["changes"] == {"rollout.vllm.url": {"old": "<absent>", "new": url}}


def test_config_changes_take_a_key_the_old_side_lacks_at_its_default_as_unchanged():
    from vlrl.train.rundir import config_changes

    defaults = {"seed": 0, "rollout": {"engine": "hf", "vllm": {"url": "", "dtype": "float32"}}, "kw": {}}
    old = {"model": "a", "rollout": {"group_size": 8}, "kw": {}}
    new = {"model": "a", "seed": 0, "rollout": {"group_size": 8, "engine": "hf", "vllm": {"url": "", "dtype": "bf16"}},
           "kw": {"scale": "batch"}, "extra": 1}
    assert [str(c) for c in config_changes(old, new, defaults=defaults)] == [
        "extra: '<absent>' -> 1", "kw.scale: '<absent>' -> 'batch'", "rollout.vllm.dtype: '<absent>' -> 'bf16'"]
    assert len(config_changes(old, new)) == 5  # without defaults every key the old side lacks is a change
