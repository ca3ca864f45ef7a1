"""`vlrl --help` and `vlrl <command> --help`: every command and every config key, each described."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import pytest

from vlrl.cli import COMMANDS, main
from vlrl.curate.run import CurateConfig
from vlrl.eval.evaluate import EvalConfig
from vlrl.train.rl import RLConfig
from vlrl.train.sft import SFTConfig

# command -> (its config class, the function that `--help` must not call)
CONFIG_COMMANDS: dict[str, tuple[type, str]] = {
    "sft": (SFTConfig, "vlrl.train.sft.run_sft"),
    "rl": (RLConfig, "vlrl.train.rl.run_rl"),
    "eval": (EvalConfig, "vlrl.eval.evaluate.run_eval"),
    "curate": (CurateConfig, "vlrl.curate.run.run_curate"),
}
KEY_LINE = re.compile(r"^  (\S+): (.+)$")
HELP_LINE = re.compile(r"^ {6}(.*)$")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr); a SystemExit (argparse's --help) gives its code."""
    try:
        code: Any = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """The config's keys as `build` accepts them: nested dataclass sections as dotted paths."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out += dotted_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def printed_keys(out: str) -> dict[str, tuple[str, str]]:
    """key -> (its `type = default` text, its description line) from the keys block of a command's help."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("keys ")) + 1
    keys: dict[str, tuple[str, str]] = {}
    for i in range(start, len(lines)):
        m = KEY_LINE.match(lines[i])
        if m is None:
            continue
        assert m.group(1) not in keys, f"{m.group(1)} printed twice"
        desc = HELP_LINE.match(lines[i + 1]) if i + 1 < len(lines) else None
        keys[m.group(1)] = (m.group(2), desc.group(1).strip() if desc else "")
    return keys


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_config_command_help_lists_every_key_with_a_description(
    command: str, flag: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cls, runner = CONFIG_COMMANDS[command]

    def must_not_run(cfg: Any) -> None:
        raise AssertionError(f"vlrl {command} {flag} ran the command")

    monkeypatch.setattr(runner, must_not_run)
    code, out, err = run([command, flag], capsys)
    assert code == 0, err
    assert "unknown key" not in out + err
    keys = printed_keys(out)
    assert set(keys) == set(dotted_fields(cls))
    assert len(keys) == len(dotted_fields(cls))
    undocumented = sorted(k for k, (_, desc) in keys.items() if not desc)
    assert undocumented == []
    for key, (head, _) in keys.items():
        assert re.fullmatch(r".+ = .+|.+  \(required\)", head), f"{key}: no type / default in {head!r}"
    for how in ("--config FILE.yaml", "key=value", "--key value"):
        assert how in out


def test_rl_help_shows_types_defaults_and_nested_sections(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["rl", "--help"], capsys)
    keys = printed_keys(out)
    assert code == 0
    assert keys["model"][0] == "str  (required)"
    assert keys["optim.lr"][0] == "float = 1e-06"
    assert keys["algorithm.kl_clamp"][0] == "float | None = null"
    assert keys["rollout.group_size"] == ("int = 8", "G: completions per prompt")
    assert keys["replay.coef"][0] == "float = 0.0" and keys["validation.every"][0] == "int = 0"
    assert keys["rewards"][0] == "list[RewardSpec] = [{name: accuracy, weight: 1.0, kwargs: {}, label: null}]"
    assert keys["trust.enabled"] == ("bool = false",
                                     "mix the judge's process rewards into the rewards (Trust-GRPO)")
    assert keys["trust.judge.timeout"][0] == "float = 60.0"
    # the section's default comes from TrustConfig's factory
    assert keys["trust.judge.base_url"][0] == "str = http://127.0.0.1:8000/v1"
    assert "section.key=value" in out and "rollout.engine=hf" in out
    # a continuation comment line (`#   ...`) is part of the description
    assert keys["shared_prefix"][1].endswith("its KV cache expanded to the group's rows (same log-probs and "
                                             "gradients; off: [prompt | completion] per row)")


def test_command_list_names_every_command_with_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    outputs = [run(argv, capsys) for argv in (["--help"], ["-h"], [])]
    assert all(code == 0 for code, _, _ in outputs)
    assert len({out for _, out, _ in outputs}) == 1
    out = outputs[0][1]
    lines = out.splitlines()
    listed = dict(re.match(r"^  (\S+)\s+(.+)$", line).groups()  # type: ignore[union-attr]
                  for line in lines[lines.index("commands:") + 1 :] if line.strip())
    assert list(listed) == list(COMMANDS)
    assert all(len(desc.strip()) > 10 for desc in listed.values())
    assert listed["rl"].startswith("RL fine-tuning")


def test_unknown_command_lists_commands_on_stderr_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["bogus"], capsys)
    assert code == 2
    assert out == ""
    assert "error: unknown command 'bogus'" in err.splitlines()
    assert all(f"  {name} " in err for name in COMMANDS)
    _, help_out, _ = run(["--help"], capsys)
    assert err.startswith(help_out.rstrip("\n"))
