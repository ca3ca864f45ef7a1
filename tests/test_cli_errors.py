"""User errors on the command line: every bad value is `error: ...` with exit code 2, found before any model loads,
and nothing is written (issue 18, findings 9 and 10).

Each command runs in-process (`vlrl.cli.main`) against a model folder that does not exist, so a value that slips
past validation fails later with another message; each case names the key its error must mention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlrl.cli import main
from vlrl.config import ConfigError, load_config, parse_overrides


def _tree(root: Path) -> list[tuple[str, int | None]]:
    """Every path under `root` with its file's modification time: what a refused command must leave as it was."""
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns if p.is_file() else None) for p in root.rglob("*"))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of `vlrl ARGV` (argparse's own errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _refused(cases: list[tuple[list[str], str]], root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each case (argv, text its error must contain) exits 2 with `error:` and that text, and writes nothing."""
    wrong = []
    for argv, expected in cases:
        before = _tree(root)
        try:
            code, err = _run(argv, capsys)
        except Exception as exc:  # a traceback for the user
            wrong.append(f"{argv}: raised {type(exc).__name__}: {exc}")
            continue
        if code != 2 or "error:" not in err or expected not in err:
            wrong.append(f"{argv}: exit {code}, expected {expected!r} in: {err.strip()[-300:]!r}")
        elif _tree(root) != before:
            wrong.append(f"{argv}: wrote {sorted(set(_tree(root)) - set(before))}")
    assert not wrong, "\n".join(wrong)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    """A model folder that does not exist, a data file, an out folder not yet made, and an existing file."""
    (tmp_path / "data.jsonl").write_text('{"id": "1", "image": "x.png", "problem": "How many?", "solution": "3"}\n')
    (tmp_path / "a_file").write_text("not a folder\n")
    return {"model": str(tmp_path / "nomodel"), "data": str(tmp_path / "data.jsonl"), "out": str(tmp_path / "run"),
            "file": str(tmp_path / "a_file")}


def _config_cases(base: list[str], bad: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """`base + [override]` for each (override, key its error names)."""
    return [([*base, override], key) for override, key in bad]


SFT_BAD = [
    ("batch_size=0", "batch_size"), ("micro_batch_size=0", "micro_batch_size"), ("max_steps=-1", "max_steps"),
    ("max_steps=0", "max_steps"), ("lr=nan", "lr"), ("lr=inf", "lr"), ("lr=-1e-3", "lr"), ("lr=0", "lr"),
    ("weight_decay=-1", "weight_decay"), ("adam_betas=[0.9]", "adam_betas"), ("adam_betas=[0.9, 1.5]", "adam_betas"),
    ("warmup_steps=-1", "warmup_steps"), ("min_lr_ratio=2", "min_lr_ratio"), ("max_grad_norm=0", "max_grad_norm"),
    ("loss_agg=mean", "loss_agg"), ("stage=partial", "stage"), ("template=bogus", "template"),
    ("save_every=-1", "save_every"), ("keep_checkpoints=-1", "keep_checkpoints"), ("log_every=-1", "log_every"),
    ("val_limit=0", "val_limit"), ("eval_every=-1", "eval_every"), ("threads=-1", "threads"),
    ("shuffle_buffer=0", "shuffle_buffer"), ("max_seconds=0", "max_seconds"), ("max_seconds=nan", "max_seconds"),
    ("data=[]", "data"), ("data=[null]", "data"), ("report_to=[tensorbord]", "report_to"),
    ("seed=-1", "seed"), ("model=", "model"), ("nonfinite_limit=-1", "nonfinite_limit"),
    ("resume_changes=maybe", "resume_changes"), ("checkpoint_format=pickle", "checkpoint_format"),
]


def test_sft_bad_values(paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sft", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['out']}"]
    cases = _config_cases(base, SFT_BAD)
    cases.append((["sft", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['file']}"], "out"))
    cases.append(([*base, "stream=true", "cache_encoded=true"], "cache_encoded"))
    _refused(cases, tmp_path, capsys)


RL_BAD = [
    ("rollout.batch_size=0", "rollout.batch_size"), ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.temperature=0", "rollout.temperature"), ("rollout.temperature=nan", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"), ("rollout.top_p=1.5", "rollout.top_p"), ("rollout.top_k=-1", "rollout.top_k"),
    ("rollout.max_new_tokens=-5", "rollout.max_new_tokens"), ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.reward_timeout=0", "rollout.reward_timeout"), ("rollout.reward_workers=-1", "rollout.reward_workers"),
    ("rollout.max_prompts_per_call=-1", "rollout.max_prompts_per_call"),
    ("algorithm.loss=bogus", "bogus"), ("algorithm.advantage=bogus", "bogus"), ("algorithm.beta=-1", "algorithm.beta"),
    ("algorithm.eps_low=-0.1", "algorithm.eps_low"), ("algorithm.dual_clip=0.5", "algorithm.dual_clip"),
    ("algorithm.kl_clamp=0", "algorithm.kl_clamp"), ("algorithm.kl_estimator=k9", "k9"),
    ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs"), ("optim.lr=nan", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("optim.adam_betas=[1, 1]", "optim.adam_betas"), ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("replay.batch_size=0", "replay.batch_size"),
    ("logging.log_samples=-1", "logging.log_samples"), ("logging.save_every=-1", "logging.save_every"),
    ("logging.log_every=-1", "logging.log_every"), ("logging.keep_checkpoints=-1", "logging.keep_checkpoints"),
    ("validation.limit=0", "validation.limit"), ("validation.every=-1", "validation.every"),
    ("validation.max_new_tokens=0", "validation.max_new_tokens"), ("trust.threshold=nan", "trust.threshold"),
    ("trust.judge.timeout=inf", "trust.judge.timeout"), ("rewards=[{name: bogus}]", "bogus"),
    ("max_steps=-1", "max_steps"), ("max_steps=0", "max_steps"), ("dtype=float8", "dtype"),
    ("micro_batch_size=0", "micro_batch_size"), ("data=[]", "data"), ("template=bogus", "template"),
    ("max_pixels=-1", "max_pixels"), ("seed=-1", "seed"), ("threads=-1", "threads"),
    ("max_seconds=-1", "max_seconds"), ("logging.report_to=[bogus]", "report_to"),
    ("algorithm.advantage_kwargs={bogus: 1}", "advantage_kwargs"),
    ("algorithm.advantage_kwargs={scale: sideways}", "advantage_kwargs"),
    ("nonfinite_limit=-1", "nonfinite_limit"), ("resume_changes=maybe", "resume_changes"),
    ("checkpoint_format=pickle", "checkpoint_format"),
]


def test_rl_bad_values(paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["rl", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['out']}"]
    cases = _config_cases(base, RL_BAD)
    cases.append((["rl", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['file']}"], "out"))
    _refused(cases, tmp_path, capsys)


EVAL_BAD = [
    ("n=0", "n"), ("batch_size=0", "batch_size"), ("max_new_tokens=-5", "max_new_tokens"),
    ("temperature=-1", "temperature"), ("temperature=nan", "temperature"), ("n=4", "temperature"),
    ("limit=0", "limit"), ("threshold=nan", "threshold"), ("reward=[bogus]", "bogus"), ("template=bogus", "template"),
    ("seed=-1", "seed"), ("threads=-1", "threads"), ("data=[]", "data"),
]


def test_eval_bad_values(paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    base = ["eval", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={results}"]
    cases = _config_cases(base, EVAL_BAD)
    (tmp_path / "done.json").write_text(json.dumps({"n": 1, "accuracy": 1.0}))  # a finished evaluation
    (tmp_path / "adir").mkdir()
    for out, expected in (("done.json", "overwrite"), ("adir", "out"), ("a_file/r.json", "out")):
        cases.append((["eval", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={tmp_path / out}"], expected))
    _refused(cases, tmp_path, capsys)


def test_eval_overwrite_replaces_a_finished_evaluation_only_when_asked(tmp_path: Path) -> None:
    from vlrl.eval.evaluate import EvalConfig

    done = tmp_path / "done.json"
    done.write_text("{}")
    with pytest.raises(ConfigError, match="overwrite"):
        load_config(EvalConfig, None, ["model=m", "data=[d]", f"out={done}"])
    assert load_config(EvalConfig, None, ["model=m", "data=[d]", f"out={done}", "overwrite=true"]).overwrite


CURATE_BAD = [
    ("n=0", "n"), ("batch_size=0", "batch_size"), ("temperature=0", "temperature"), ("top_p=0", "top_p"),
    ("top_k=-1", "top_k"), ("band=[0.6, 0.1]", "band"), ("threshold=nan", "threshold"), ("max_keep=-1", "max_keep"),
    ("dtype=float8", "dtype"), ("rollout_engine=sglang", "rollout_engine"), ("limit=0", "limit"),
    ("pass1=best", "pass1"), ("max_new_tokens=-5", "max_new_tokens"), ("reward=[bogus]", "bogus"),
    ("template=bogus", "template"), ("min_pixels=0", "min_pixels"), ("seed=-1", "seed"), ("data=[]", "data"),
]


def test_curate_bad_values(paths: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["curate", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['out']}"]
    cases = _config_cases(base, CURATE_BAD)
    cases.append((["curate", f"model={paths['model']}", f"data=[{paths['data']}]", f"out={paths['file']}"], "out"))
    _refused(cases, tmp_path, capsys)


def test_argparse_commands_bad_values(paths: dict[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    m, d, out, f = paths["model"], paths["data"], paths["out"], paths["file"]
    cases = [
        (["data", "synth", "--task", "counting", "--n", "-5", "--out", out], "--n"),
        (["data", "synth", "--task", "counting", "--n", "0", "--out", out], "--n"),
        (["data", "synth", "--task", "counting", "--n", "2", "--out", f], "--out"),
        (["data", "validate", d, "--model", m, "--prompt-budget", "0"], "--prompt-budget"),
        (["data", "convert", d, "--out", str(tmp_path)], "--out"),
        (["infer", "--model", m, "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["infer", "--model", m, "--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["infer", "--model", m, "--prompt", "hi", "--temperature", "nan"], "--temperature"),
        (["score", "--data", d, "--out", out, "--workers", "-1"], "--workers"),
        (["score", "--data", d, "--out", out, "--timeout", "0"], "--timeout"),
        (["score", "--data", d, "--out", out, "--timeout", "nan"], "--timeout"),
        (["score", "--data", d, "--out", out, "--threshold", "nan"], "--threshold"),
        (["score", "--data", d, "--out", out, "--reward", "bogus"], "bogus"),
        (["score", "--data", d, "--out", str(tmp_path)], "--out"),
        (["init-model", "--out", f], "--out"),
        (["init-model", "--out", out, "--seed", "-1"], "--seed"),
        (["serve", "--model", m, "--port", "99999"], "--port"),
        (["serve", "--model", m, "--port=-1"], "--port"),
        (["report", str(tmp_path), "--steps", "-1"], "--steps"),
        (["report", str(tmp_path), "--out", str(tmp_path)], "--out"),
    ]
    _refused(cases, tmp_path, capsys)


BOMB = """\
model: m
data: [d]
out: o
algorithm:
  advantage_kwargs:
    a: &a [x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
"""


def test_yaml_alias_in_a_config_is_refused_with_file_and_line(tmp_path: Path, capsys) -> None:
    from vlrl.train.rl_config import RLConfig

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError, match=rf"{path}:6: .*alias"):
        load_config(RLConfig, path)
    with pytest.raises(ConfigError, match="alias"):
        parse_overrides(["algorithm.advantage_kwargs={a: &a [1, 2], b: [*a, *a]}"])
    code, err = _run(["rl", "--config", str(path)], capsys)
    assert code == 2 and "error:" in err and "alias" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_malformed_yaml_is_a_config_error_with_file_and_line(tmp_path: Path) -> None:
    from vlrl.train.sft import SFTConfig

    path = tmp_path / "bad.yaml"
    path.write_text("model: m\ndata: [d\nout: o\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: "):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match="lr"):
        parse_overrides(["lr=[1, 2"])
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="deep"):
        load_config(SFTConfig, path)
    path.write_text("1: a\nmodel: m\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SFTConfig, path)


def test_a_malformed_score_input_line_is_an_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    data = tmp_path / "completions.jsonl"
    data.write_text('{"completion": "3"}\n')  # no problem, no answer
    code, err = _run(["score", "--data", str(data), "--out", str(tmp_path / "scored.jsonl")], capsys)
    assert code == 2 and f"error: {data}:1:" in err


def test_a_run_that_stops_itself_is_an_error_line_with_exit_1(monkeypatch, capsys):
    """A full disk at a checkpoint or K non-finite steps in a row stop a run with a message that says what to do:
    the CLI prints it as `error: ...` (exit 1), not a traceback; any other RuntimeError stays a traceback."""
    from vlrl import cli
    from vlrl.train.checkpoint import CheckpointWriteError
    from vlrl.train.harness import NonFiniteError

    for err in (CheckpointWriteError("could not write step-4: disk full"), NonFiniteError("5 steps in a row")):
        monkeypatch.setitem(cli.COMMANDS, "sft", lambda rest, err=err: (_ for _ in ()).throw(err))
        assert cli.main(["sft"]) == 1
        assert capsys.readouterr().err.strip() == f"error: {err}"
    monkeypatch.setitem(cli.COMMANDS, "sft", lambda rest: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sft"])


def test_a_vllm_engine_error_is_an_error_line_with_exit_2(monkeypatch, capsys):
    """No vLLM environment, a worker that died or does not answer: rl, eval, curate and serve print the engine's
    message (it says what to do) as `error: ...` with exit code 2, not a traceback."""
    from vlrl import cli
    from vlrl.rollout.vllm_engine import PromptMismatchError, VLLMEngineError

    for command, err in (("rl", VLLMEngineError("no vLLM environment at x; build it with `make vllm-env`")),
                         ("eval", VLLMEngineError("the vLLM worker died (exit code -9)")),
                         ("curate", PromptMismatchError("vLLM and vlrl encode prompt 0 differently")),
                         ("serve", VLLMEngineError("the vLLM worker exited with code 1 while starting"))):
        monkeypatch.setitem(cli.COMMANDS, command, lambda rest, err=err: (_ for _ in ()).throw(err))
        assert cli.main([command]) == 2
        assert capsys.readouterr().err.strip() == f"error: {err}"


def test_eval_with_no_vllm_worker_at_its_url_is_an_error_not_a_traceback(tiny_model_dir, synth_dir, tmp_path,
                                                                         capsys):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["eval", f"model={tiny_model_dir}", f"data=[{synth_dir / 'counting' / 'test.jsonl'}]", "limit=1",
            f"out={tmp_path / 'results.json'}", "engine=vllm", f"vllm.url=http://127.0.0.1:{port}",
            "vllm.startup_timeout=1"]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: no vLLM worker answers at") and "vllm.url" in err
    assert "Traceback" not in err and not (tmp_path / "results.json").exists()
    assert not (tmp_path / "results.config.yaml").exists()  # a refused evaluation writes nothing
