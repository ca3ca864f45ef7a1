"""`vlrl report` on hand-made run directories: every metric lands in one group and one panel, the page loads
nothing from the network, images are inline data URLs (a placeholder naming the path when unreadable), and text
from the run files is escaped."""

from __future__ import annotations

import html
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlrl.cli import main
from vlrl.report import write_report
from vlrl.report.groups import OTHER, group_metrics, group_of, metric_keys
from vlrl.report.page import fmt_reward, pick_steps
from vlrl.report.plots import smooth

pytest.importorskip("plotly")

# every key `vlrl rl` documents (train/rl.py), SFT's and curation's, and keys no group names
RL_KEYS = [
    "elapsed_s", "lr", "time/rollout", "time/reward", "time/ref_logp", "time/old_logp", "time/advantage",
    "time/update", "time/step", "time/eval", "reward/mean", "reward/std", "reward/accuracy", "reward/answer_format",
    "reward/unscored", "reward/sampled_mean", "adv/mean", "adv/std", "adv/min", "adv/max", "adv/frac_zero_std_groups",
    "frac_zero_std_groups", "dynamic/tries", "dynamic/prompts", "dynamic/kept_groups", "dynamic/fallback",
    "completion/len_mean", "completion/len_max", "completion/truncated_frac", "sft_replay/loss", "loss", "grad_norm",
    "updates", "entropy", "kl", "approx_kl", "clip_frac/low", "clip_frac/high", "clip_frac/region", "clip_frac/dual",
    "ratio/mean", "rollout/logp_diff", "val_accuracy", "val_accuracy/chart", "trust/weight", "trust/gamma_mean",
]
SFT_KEYS = ["loss", "target_tokens", "grad_norm", "lr", "step_s", "elapsed_s", "val_accuracy", "val_accuracy/counting"]
CURATE_KEYS = ["items_done", "items_total", "mean_reward", "mean_pass_rate", "time/generate", "time/score", "elapsed_s"]
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_every_metric_key_is_in_exactly_one_group() -> None:
    keys = sorted(set(RL_KEYS + SFT_KEYS + CURATE_KEYS + ["mystery", "weird/key"]))
    groups = group_metrics(keys)
    placed = [k for group in groups.values() for k in group]
    assert sorted(placed) == keys  # each once
    expected = {"reward/accuracy": "Rewards", "reward/mean": "Rewards", "mean_reward": "Rewards",
                "val_accuracy": "Accuracy", "val_accuracy/chart": "Accuracy", "kl": "KL", "approx_kl": "KL",
                "entropy": "Entropy", "completion/len_mean": "Response length", "clip_frac/dual": "Clip fraction",
                "time/rollout": "Seconds", "time/generate": "Seconds", "step_s": "Seconds", "loss": "Loss and optimizer",
                "sft_replay/loss": "Loss and optimizer", "adv/std": "Advantages and sampling", "mystery": OTHER,
                "weird/key": OTHER, "items_done": OTHER}
    assert {k: group_of(k) for k in expected} == expected
    assert list(groups)[0] == "Rewards" and list(groups)[-1] == OTHER
    assert groups["Rewards"][0] == "reward/mean" and groups["Accuracy"][0] == "val_accuracy"  # headline first


def test_metric_keys_take_numbers_and_nulls_not_strings_or_the_step() -> None:
    records = [{"step": 1, "loss": 1.0, "note": "text", "flag": True}, {"step": 2, "kl": None, "loss": 2}]
    assert metric_keys(records) == ["loss", "kl"]


def test_pick_steps_and_smoothing() -> None:
    assert pick_steps([1, 2, 3], 5) == [1, 2, 3]
    assert pick_steps(list(range(1, 101)), 4) == [1, 34, 67, 100]
    assert pick_steps(list(range(1, 11)), 1) == [10] and pick_steps([4, 5], 0) == [4, 5]
    # debiased EMA (TensorBoard): first value kept, then 0.5*(2*0.5*1 + 0.5*3)/(0.5*0.5+0.5) ...
    assert smooth([1.0, 3.0, None, 3.0], 0.5) == pytest.approx([1.0, 1 * 0.25 / 0.75 + 3 * 0.5 / 0.75, None,
                                                                (0.25 * 1 + 0.5 * 3) * 0.5 / 0.875 + 3 * 0.5 / 0.875])


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


def make_run(root: Path, *, images: bool = True) -> Path:
    """An RL-like run directory: 6 logged steps of every RL key, validation on steps 3 and 6, samples of steps 3
    and 6 with a readable, a missing and a corrupt image; an eval results file beside it (in the parent)."""
    run = root / "rl"
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 7):
        rec: dict[str, Any] = {"step": step, **{k: 0.1 * step for k in RL_KEYS if not k.startswith("val_")}}
        rec["kl"] = None if step == 2 else rec["kl"]  # a non-finite value logged as null
        if step % 3 == 0:
            rec.update({"val_accuracy": 0.5, "val_accuracy/chart": 0.25 * step / 3})
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')  # a line being written
    good = _png(root / "good.png", (200, 30, 30))
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows = []
    for step in (3, 6):
        for i in range(4):
            row: dict[str, Any] = {"step": step, "row": i, "id": f"item-{i // 2}", "answer": "3",
                                   "completion": EVIL if i == 1 else f"<answer>{i}</answer>", "reward": 1.1 - 0.5 * i,
                                   "advantage": 0.75 - 0.5 * i, "reward/accuracy": float(i == 0),
                                   "reward/answer_format": None if i == 3 else 1.0, "length": 4, "truncated": i == 2}
            if images:
                paths = [good, str(root / "missing.png")] if i < 2 else [str(root / "corrupt.png")]
                row.update(images=paths, prompt=f"<image>How many shapes? {EVIL}")
            rows.append(json.dumps(row))
    (run / "samples.jsonl").write_text("\n".join(rows) + "\n")
    (root / "eval").mkdir()
    (root / "eval" / "rl.json").write_text(json.dumps(
        {"n": 10, "accuracy": 0.6, "by_task": {"chart": {"n": 10, "accuracy": 0.6}}, "model": EVIL, "seconds": 1.0}))
    return run


class Tags(HTMLParser):
    """Every element's (tag, attributes); a <script>'s content is not markup, so it is not parsed."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def figures(text: str) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """{div id: (traces, layout)} of each `Plotly.newPlot(id, traces, layout, config)` call in the page."""
    dec = json.JSONDecoder()
    out = {}
    for m in re.finditer(r"Plotly\.newPlot\(\s*", text):
        pos, values = m.end(), []
        for _ in range(3):
            value, pos = dec.raw_decode(text, pos)
            values.append(value)
            pos = re.compile(r"\s*,\s*").match(text, pos).end()  # type: ignore[union-attr]
        out[values[0]] = (values[1], values[2])
    return out


def test_the_page_draws_every_metric_loads_nothing_from_the_network_and_escapes_run_text(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = write_report(run, tmp_path / "page.html")
    text = out.read_text()
    tags = Tags(text).tags
    # self-contained: no element loads or links anything outside the page
    for tag, attrs in tags:
        for name in ("src", "href"):
            value = (attrs.get(name) or "").strip().lower()
            assert not re.match(r"^(https?:)?//", value), (tag, attrs)
            if value:
                assert value.startswith(("data:", "#")), (tag, attrs)
    assert not [t for t, a in tags if t in ("link", "iframe")]
    assert all("src" not in a for t, a in tags if t == "script")  # plotly.js is inline
    # images: inline data URLs, a placeholder naming each unreadable path
    srcs = [a["src"] for t, a in tags if t == "img"]
    assert srcs and all(s and s.startswith("data:image/png;base64,") for s in srcs)
    assert f"<code>{html.escape(str(tmp_path / 'missing.png'))}</code>" in text
    assert f"<code>{html.escape(str(tmp_path / 'corrupt.png'))}</code>" in text
    # every metric key of metrics.jsonl is a panel of one figure, with the run's curve in it
    figs = figures(text)
    keys = [k for k in RL_KEYS]
    titles = {a["text"]: div for div, (_, layout) in figs.items() for a in layout["annotations"]}
    assert sorted(titles) == sorted(html.escape(k) for k in keys)
    for div, (traces, _) in figs.items():
        assert div.startswith("plot-") and f'id="{div}"' in text and traces
        assert all(t["name"] == "rl" and len(t["x"]) == len(t["y"]) > 0 for t in traces)
    kl = next(t for t in figs[titles["kl"]][0] if t["hovertemplate"].find(">kl =") > 0)
    assert kl["x"] == [1, 2, 3, 4, 5, 6] and kl["y"][1] is None
    # run text is escaped wherever it is shown: completions, prompts, the eval file's model
    assert EVIL not in text and "onerror=alert(1)>" not in text
    assert text.count(html.escape(EVIL)) >= 5
    # rollouts: the last step shown, every step selectable, each reward and the advantage in the rows
    assert re.search(r'<div class="step" data-step="6">', text) and '<div class="step" data-step="3" hidden>' in text
    assert '<option value="3">step 3</option>' in text and '<option value="6" selected>step 6</option>' in text
    for value in (1.1, 0.6, -0.4, 0.75, -0.75):
        assert f">{fmt_reward(value)}</td>" in text
    assert "<th>accuracy</th><th>answer_format</th><th>advantage</th>" in text
    # validation and eval tables
    assert re.search(r"<th>step</th><th>val_accuracy</th><th>val_accuracy/chart</th>", text)
    assert "<td>chart</td><td>60.0</td>" in text
    assert '<td class="num">8</td><td class="num">1</td></tr>' in text  # 8 rollout rows; the half-written line


def test_old_samples_without_images_or_prompts_still_render(tmp_path: Path) -> None:
    run = make_run(tmp_path, images=False)
    text = write_report(run).read_text()
    assert (run / "report.html").is_file()
    assert "no images or prompts" in text and "<img" not in text
    assert ">1.100</td>" in text


def test_a_folder_of_runs_is_compared_in_the_same_panels(tmp_path: Path) -> None:
    make_run(tmp_path)
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3}) + "\n"
                                               for s in (10, 20)))
    (tmp_path / "summary.json").write_text(json.dumps({"tasks": {"chart": {"sft": 0.5, "rl": 0.75}}, "seconds": 3.0}))
    text = write_report(tmp_path).read_text()
    figs = figures(text)
    loss = figs["plot-loss-and-optimizer"][0]
    assert {t["name"] for t in loss} == {"rl", "sft"}
    assert "<th>tasks</th><th>sft</th><th>rl</th>" in text and '<td class="num">0.75</td>' in text


def test_cli_report_writes_the_page_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    assert main(["report", str(run), "--out", str(tmp_path / "x" / "r.html"), "--steps", "1"]) == 0
    assert "report: " in capsys.readouterr().out
    text = (tmp_path / "x" / "r.html").read_text()
    assert 'data-step="6"' in text and 'data-step="3"' not in text
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_missing_plotly_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'vlrl\[report\]'"):
        write_report(run)
    with pytest.raises(SystemExit) as stop:  # as the `vlrl` script exits: status 2, the reason on stderr
        main(["report", str(run)])
    assert stop.value.code == 2
    assert "vlrl[report]" in capsys.readouterr().err
    assert not (run / "report.html").exists()


def test_a_curation_run_shows_its_curves_and_report_without_rollouts(tmp_path: Path) -> None:
    run = tmp_path / "curate"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **{k: float(s) for k in CURATE_KEYS}}) + "\n"
                                               for s in (1, 2)))
    (run / "samples.jsonl").write_text(json.dumps({"id": "a", "samples": [{"text": "x", "reward": 1.0}]}) + "\n")
    (run / "report.json").write_text(json.dumps({"complete": True, "kept_fraction": 0.5,
                                                 "per_task": {"chart": {"n": 4, "kept": 2}}}))
    text = write_report(run).read_text()
    titles = {a["text"] for _, layout in figures(text).values() for a in layout["annotations"]}
    assert titles == set(CURATE_KEYS)
    assert '<section id="summary">' in text and "<th>per_task</th><th>n</th><th>kept</th>" in text
    assert '<section id="rollouts">' not in text
