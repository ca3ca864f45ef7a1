"""`vlrl <command>`: each command parses a typed config and calls one function.

Config-driven commands (`sft`, `eval`, ...) take `--config FILE.yaml` plus overrides written either as
`key=value` (dotted for nested keys) or as `--key value`; a repeated `--key` makes a list.

`vlrl --help` lists the commands (each one's docstring summary); `vlrl <command> --help` prints a config
command's keys with their types, defaults and descriptions (the config dataclass's field comments).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlrl.config import ConfigError, KeyDoc, check_out_path, config_keys, describe_config, load_config
from vlrl.data.errors import DataError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a `key=value` word: never the value of a preceding --switch
HELP_FLAGS = ("-h", "--help")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an int >= `low`, else argparse's `error: argument --x: ...` (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite_float(low: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite float, >= `low` (> `low` if `strict`) when `low` is given."""
    bound = "" if low is None else f" {'>' if strict else '>='} {low}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value < low or (strict and value == low))):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    """An argparse `type`: a TCP port, 1..65535."""
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1..65535, got {value}")
    return value


def _check_outs(parser: argparse.ArgumentParser, outs: list[tuple[str, str | None, str]]) -> None:
    """argparse's error (exit 2) for an output path (flag, path, dir | file) that cannot be written, before any
    work: a file where a folder goes, a folder where a file goes, a path under a file."""
    for flag, path, kind in outs:
        if path is None:
            continue
        try:
            check_out_path(flag, path, kind)
        except ValueError as err:
            parser.error(str(err))


def _flags_to_overrides(rest: list[str], list_keys: tuple[str, ...] = ()) -> list[str]:
    """['--model', 'M', '--data', 'a', '--data', 'b', 'lr=1e-3'] -> ['model=M', 'data=[a, b]', 'lr=1e-3'].
    A switch followed by a `key=value` word is a flag (`--parquet limit=5` -> parquet=true, limit=5)."""
    pairs: dict[str, list[str]] = {}
    plain: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            if "=" in key:
                key, val = key.split("=", 1)
                i += 1
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--") and not OVERRIDE.match(rest[i + 1]):
                val, i = rest[i + 1], i + 2
            else:
                val, i = "true", i + 1
            pairs.setdefault(key, []).append(val)
        else:
            plain.append(tok)
            i += 1
    out = []
    for key, vals in pairs.items():
        if len(vals) > 1 or key in list_keys:
            out.append(f"{key}=[{', '.join(json.dumps(v) for v in vals)}]")
        else:
            out.append(f"{key}={json.dumps(vals[0]) if _needs_quotes(vals[0]) else vals[0]}")
    return out + plain


def _needs_quotes(v: str) -> bool:
    return any(c in v for c in ":#{}[],&*!|>'\"%@`") or v.strip() != v


def _example(key: KeyDoc) -> str:
    return f"{key.key}={'true' if key.type == 'bool' else key.default or 'VALUE'}"


def _how_to_pass(keys: list[KeyDoc]) -> list[str]:
    """How to set `keys` on the command line, with examples taken from the keys themselves."""
    number = next((k for k in keys if k.type in ("int", "float")), keys[0])
    snake = next((k.key for k in keys if "_" in k.key and "." not in k.key), number.key)
    dotted = next((k for k in keys if "." in k.key), None)
    lines = ["Values come from --config FILE.yaml (a YAML mapping of the keys below), then from the command",
             "line, which overrides the file. A value is read as YAML: 3e-4, true, null, [a, b], {k: v}.",
             f"  key=value          e.g. {_example(number)}"]
    if dotted is not None:
        lines.append(f"  section.key=value  a key of a nested section, e.g. {_example(dotted)}")
    switch = "--" + snake.replace("_", "-")
    lines += [f"  --key value        the same as key=value ({switch} sets {snake}); a repeated --key makes",
              "                     a list, and a --key with no value after it means key=true"]
    return lines


def _config_help(command: str, cls: type) -> str:
    """`vlrl <command> --help` of a config-driven command: how to pass values, then every key of `cls`."""
    lines = [f"usage: vlrl {command} [--config FILE.yaml] [key=value ...] [--key value ...]", "",
             _summary(COMMANDS[command]), "", *_how_to_pass(config_keys(cls)), "",
             "keys (name: type = default, then what it sets):", describe_config(cls)]
    return "\n".join(lines)


def _run_config_command(command: str, cls: type, fn: Callable[[Any], Any], rest: list[str],
                        list_keys: tuple[str, ...] = ()) -> Any:
    if any(tok in HELP_FLAGS for tok in rest):  # as argparse's --help: print, exit 0, run nothing
        print(_config_help(command, cls))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(rest)
    cfg: Any = load_config(cls, known.config, _flags_to_overrides(rest, list_keys))
    return fn(cfg)


def cmd_sft(rest: list[str]) -> None:
    """supervised fine-tuning: the merger alone (stage align) or the whole VLM (stage full)"""
    from vlrl.train.sft import SFTConfig, run_sft

    final = _run_config_command("sft", SFTConfig, run_sft, rest, list_keys=("data", "val_data"))
    print(f"final checkpoint: {final}")


def cmd_rl(rest: list[str]) -> None:
    """RL fine-tuning with verifiable rewards: GRPO, GSPO, DAPO, Dr.GRPO, Trust-GRPO"""
    from vlrl.train.rl import run_rl
    from vlrl.train.rl_config import RLConfig

    final = _run_config_command("rl", RLConfig, run_rl, rest, list_keys=("data", "validation.data", "replay.data"))
    print(f"final checkpoint: {final}")


def cmd_eval(rest: list[str]) -> None:
    """accuracy of a model on datasets, with the answer checks that RL trains with"""
    from vlrl.eval.evaluate import EvalConfig, run_eval
    from vlrl.eval.report import print_result

    summary = _run_config_command("eval", EvalConfig, run_eval, rest, list_keys=("data", "reward"))
    print_result(summary)


def _bool_flags(rest: list[str], flags: tuple[str, ...]) -> list[str]:
    """`--parquet limit=5` -> `--parquet=true limit=5`: a switch never takes the next word as its value."""
    out = []
    for i, tok in enumerate(rest):
        nxt = rest[i + 1] if i + 1 < len(rest) else None
        out.append(f"{tok}=true" if tok in flags and nxt not in ("true", "false") else tok)
    return out


def cmd_curate(rest: list[str]) -> None:
    """keep the items of a dataset that a model sometimes solves (rollout-based difficulty filtering)"""
    from vlrl.curate.filter import format_report
    from vlrl.curate.run import CurateConfig, run_curate

    rest = _bool_flags(rest, ("--rank-by-gap", "--parquet", "--skip-invalid"))
    report = _run_config_command("curate", CurateConfig, run_curate, rest, list_keys=("data", "reward"))
    if report:  # rank 0
        print(format_report(report))
        print(f"kept: {', '.join(report['files']['kept'])}")


def cmd_init_model(rest: list[str]) -> None:
    """build a randomly initialised tiny/small Qwen-VL or InternVL model (for tests and the CPU demo)"""
    from vlrl.models.build import ARCHS, count_parameters, init_model
    from vlrl.models.loading import load_model
    from vlrl.models.sizes import SIZES

    p = argparse.ArgumentParser(prog="vlrl init-model", description="Build a random tiny/small Qwen-VL or InternVL model.")
    p.add_argument("--arch", choices=ARCHS, default="qwen2-vl",
                   help="internvl: transformers' InternVLForConditionalGeneration with a Qwen2 text model")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    a = p.parse_args(rest)
    _check_outs(p, [("--out", a.out, "dir")])
    out = init_model(a.arch, a.size, a.out, seed=a.seed)
    print(f"{a.arch}/{a.size}: {count_parameters(load_model(out)) / 1e6:.2f} M parameters -> {out}")


def cmd_data(rest: list[str]) -> None:
    """datasets: synth (synthetic tasks), validate (token budget, images), stats, convert"""
    from vlrl.data.synth import TASKS, synth_main

    p = argparse.ArgumentParser(prog="vlrl data")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("synth", help="write a synthetic task as VLM-R1 jsonl + PNG")
    s.add_argument("--task", choices=sorted(TASKS), required=True)
    s.add_argument("--n", type=_int_at_least(1), required=True)
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--split", default="train")
    s.add_argument("--out", required=True)
    v = sub.add_parser("validate", help="token budget and image check of every record against a model's processor")
    v.add_argument("spec")
    v.add_argument("--model", required=True)
    v.add_argument("--prompt-budget", type=_int_at_least(1), default=2048)
    v.add_argument("--report", help="write per-record reports as jsonl")
    st = sub.add_parser("stats", help="counts by task, problem type and answer type")
    st.add_argument("spec")
    c = sub.add_parser("convert", help="write any readable dataset as VLM-R1 jsonl, EasyR1 or verl parquet")
    c.add_argument("spec")
    c.add_argument("--out", required=True, help="OUT.jsonl or OUT.parquet")
    c.add_argument("--format", choices=("vlmr1", "easyr1", "hf", "verl"),
                   help="default by suffix: .jsonl vlmr1, .parquet easyr1")
    c.add_argument("--images", choices=("embed", "files", "paths"),
                   help="embed bytes (parquet; its default), files beside OUT, or keep paths (jsonl's default)")
    for q in (v, st, c):
        q.add_argument("--registry")
        q.add_argument("--skip-invalid", action="store_true")
    a = p.parse_args(rest)
    out_kind = "dir" if a.action == "synth" else "file"  # synth writes a folder of splits and images
    _check_outs(sub.choices[a.action], [("--out", getattr(a, "out", None), out_kind),
                                        ("--report", getattr(a, "report", None), "file")])
    if a.action == "synth":
        synth_main(a.task, a.n, a.seed, a.out, split=a.split)
    else:
        _data_audit(a)


def _data_audit(a: argparse.Namespace) -> None:
    from vlrl.curate.audit import dataset_stats, validate_samples
    from vlrl.data.registry import load_dataset

    ds = load_dataset(a.spec, registry=a.registry, skip_invalid=a.skip_invalid)
    if ds.n_skipped:
        print(f"skipped {ds.n_skipped} invalid record(s):", *ds.errors[:20], sep="\n  ")
    if a.action == "stats":
        print(json.dumps(dataset_stats(ds.samples), indent=2))
    elif a.action == "convert":
        from vlrl.data.writers import write_dataset

        print(f"{len(ds)} records -> {write_dataset(ds.samples, a.out, format=a.format, images=a.images)}")
    else:
        from dataclasses import asdict

        from vlrl.models.processor import load_processor

        reports, summary = validate_samples(ds.samples, load_processor(a.model), a.prompt_budget)
        for r in reports:
            if r.over_budget or r.token_mismatch:
                what = "over budget" if r.over_budget else "image tokens do not match"
                print(f"{r.source or r.id}: {what}: {r.total_tokens} tokens ({r.vision_tokens} vision + {r.text_tokens} text)")
        if a.report:
            Path(a.report).write_text("".join(json.dumps(asdict(r)) + "\n" for r in reports))
        print(json.dumps({**summary, "n_skipped": ds.n_skipped}, indent=2))


def cmd_infer(rest: list[str]) -> None:
    """print a model's answer to one question (with images)"""
    from vlrl.eval.infer import infer

    p = argparse.ArgumentParser(prog="vlrl infer", description="Print the model's answer to one question.")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--prompt", required=True)
    p.add_argument("--thinking", action="store_true", help="use the thinking prompt template")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=256)
    p.add_argument("--temperature", type=_finite_float(0.0), default=0.0)
    a = p.parse_args(rest)
    print(infer(a.model, a.image, a.prompt, thinking=a.thinking, max_new_tokens=a.max_new_tokens,
                temperature=a.temperature))


def cmd_score(rest: list[str]) -> None:
    """score the completions of a jsonl file with vlrl's rewards"""
    from vlrl.rewards.score import ScoreInputError, reward_specs_from_args, score_file

    p = argparse.ArgumentParser(prog="vlrl score", description="Score completions with vlrl's rewards.")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reward", action="append", default=None,
                   help="a registered reward, or one of your own as path/to/file.py:function or "
                        "package.module:function; LABEL=NAME names its key (repeatable; default accuracy)")
    p.add_argument("--workers", type=_int_at_least(0), default=0,
                   help="reward worker processes (0: in-process, no time limit)")
    p.add_argument("--timeout", type=_finite_float(0.0, strict=True), default=10.0,
                   help="with --workers: seconds per reward call")
    p.add_argument("--report", action="store_true",
                   help="compare with each line's 'expected' verdict: disagreement counts per problem type")
    p.add_argument("--threshold", type=_finite_float(), default=0.5,
                   help="with --report: reward >= this counts as correct")
    a = p.parse_args(rest)
    _check_outs(p, [("--out", a.out, "file")])
    try:
        specs = reward_specs_from_args(a.reward or ["accuracy"])
    except (KeyError, ValueError) as err:  # an unknown name, or a user reward that cannot load
        raise ConfigError(f"--reward: {err.args[0] if err.args else err}") from err
    try:
        score_file(a.data, a.out, rewards=specs, workers=a.workers, timeout=a.timeout, report=a.report,
                   threshold=a.threshold)
    except ScoreInputError as err:  # a malformed input line: its message names file, line and field
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_report(rest: list[str]) -> None:
    """write a run's HTML report: curves of every metric, validation and eval tables, rollouts with images"""
    from vlrl.report.build import MAX_ROLLOUT_STEPS, REPORT, write_report

    p = argparse.ArgumentParser(prog="vlrl report", description="Write one self-contained HTML page (no network "
                                "needed to open it) of a run directory, or of a folder of runs side by side.")
    p.add_argument("run_dir", help="a run directory (it holds metrics.jsonl), or a folder of them (runs/demo)")
    p.add_argument("--out", help=f"the HTML file (default RUN_DIR/{REPORT})")
    p.add_argument("--steps", type=_int_at_least(0), default=MAX_ROLLOUT_STEPS,
                   help="logged steps of samples.jsonl in the rollout browser (evenly spread; 0: all)")
    a = p.parse_args(rest)
    _check_outs(p, [("--out", a.out, "file")])
    try:
        out = write_report(a.run_dir, a.out, max_steps=a.steps)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)")


def cmd_serve(rest: list[str]) -> None:
    """serve a local model behind an OpenAI-compatible chat-completions endpoint"""
    from vlrl.serve.server import main as serve_main

    ports = argparse.ArgumentParser(prog="vlrl serve", add_help=False, allow_abbrev=False)
    ports.add_argument("--port", type=_port)
    ports.parse_known_args(rest)  # a port out of range: argparse's error, before the model loads
    serve_main(rest)


def cmd_export(rest: list[str]) -> None:
    """write a checkpoint as a plain Hugging Face model folder (LoRA adapters merged into their base)"""
    from vlrl.models.export import EXPORT_DTYPES, export_checkpoint

    p = argparse.ArgumentParser(prog="vlrl export", description="Write a checkpoint as a Hugging Face folder that "
                                "from_pretrained loads; LoRA adapters are merged into the base model they name.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder (runs/X/checkpoints/step-N, full or sharded) or model")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float32")
    p.add_argument("--base", default=None, help="the base model of an adapter checkpoint (default: the one it names)")
    a = p.parse_args(rest)
    _check_outs(p, [("--out", a.out, "dir")])
    print(f"exported {a.checkpoint} -> {export_checkpoint(a.checkpoint, a.out, a.dtype, a.base)}")


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "init-model": cmd_init_model,
    "data": cmd_data,
    "sft": cmd_sft,
    "rl": cmd_rl,
    "eval": cmd_eval,
    "curate": cmd_curate,
    "infer": cmd_infer,
    "score": cmd_score,
    "serve": cmd_serve,
    "report": cmd_report,
    "export": cmd_export,
}


def _summary(fn: Callable[..., Any]) -> str:
    """The first line of a command function's docstring: what the command does."""
    return fn.__doc__.strip().splitlines()[0] if fn.__doc__ and fn.__doc__.strip() else ""


def usage() -> str:
    """`vlrl --help`: every command with one line on what it does."""
    width = max(map(len, COMMANDS))
    lines = ["usage: vlrl <command> [args]      (vlrl <command> --help: that command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {_summary(fn)}" for name, fn in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        COMMANDS[argv[0]](argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a run that stopped itself or a vLLM worker that failed (the message says what to
        #   do); other errors: traceback
        from vlrl.rollout.vllm_engine import VLLMEngineError
        from vlrl.train.checkpoint import CheckpointWriteError
        from vlrl.train.harness import NonFiniteError

        if isinstance(err, VLLMEngineError):  # no vLLM environment, a worker that died or does not answer
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not isinstance(err, (CheckpointWriteError, NonFiniteError)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
