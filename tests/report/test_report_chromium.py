"""`vlrl report` of a real short RL run of the tiny model, rendered by headless Chromium: the page's scripts
draw every group's curves, the shown step's rollouts display their images and reward values, and a screenshot
is written next to the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlrl import recipes_dir
from vlrl.cli import main
from vlrl.config import load_config
from vlrl.report.groups import group_metrics, metric_keys
from vlrl.report.page import esc, fmt_reward, slug
from vlrl.train.logging import read_metrics
from vlrl.train.rl import RLConfig, run_rl
from vlrl.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.slow
pytest.importorskip("plotly")


@pytest.fixture(scope="module")
def rl_run(tiny_model_dir: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 SFT steps (so that rewards vary within groups), then 3 GRPO steps with validation on the last."""
    before = torch.get_num_threads()
    root = tmp_path_factory.mktemp("report-run")
    train, test = synth_dir / "counting" / "train.jsonl", synth_dir / "counting" / "test.jsonl"
    try:
        sft = run_sft(SFTConfig(model=str(tiny_model_dir), data=[str(train)], out=str(root / "sft"), max_steps=10,
                                batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=2, save_every=100,
                                log_every=5, threads=1))
        over = {"model": sft, "data": f"[{train}]", "out": root / "rl", "max_steps": 3, "threads": 1,
                "replay.data": f"[{train}]", "rollout.batch_size": 2, "rollout.group_size": 4,
                "rollout.max_new_tokens": 8, "validation.data": f"[{test}]", "validation.every": 3,
                "validation.limit": 8, "logging.save_every": 100, "logging.log_samples": 8}
        run_rl(load_config(RLConfig, recipes_dir() / "tiny-grpo.yaml", [f"{k}={v}" for k, v in over.items()]))
    finally:
        torch.set_num_threads(before)
    return root / "rl"


def _between(text: str, start: str, *ends: str) -> str:
    """`text` from `start` to the nearest of `ends` after it (the rest of the text when none follows)."""
    i = text.index(start)
    stops = [j for j in (text.find(e, i + len(start)) for e in ends) if j >= 0]
    return text[i : min(stops, default=len(text))]


def test_report_of_a_real_rl_run_renders_in_chromium(rl_run: Path, chromium, capsys) -> None:
    out = rl_run / "report.html"
    assert main(["report", str(rl_run), "--out", str(out)]) == 0
    print(capsys.readouterr().out.strip())
    samples = read_metrics(rl_run / "samples.jsonl")
    assert samples and all(s["images"] and Path(s["images"][0]).is_file() and "<image>" in s["prompt"] for s in samples)

    dom = chromium.run(out, "--dump-dom")
    # the curves: every group's figure was drawn by plotly (its SVG, a trace per metric of the run)
    metrics = read_metrics(rl_run / "metrics.jsonl")
    groups = group_metrics(metric_keys(metrics))
    assert {"Rewards", "Accuracy", "KL", "Entropy", "Response length", "Clip fraction", "Seconds"} <= set(groups)
    for title, keys in groups.items():
        fig = _between(dom, f'id="group-{slug(title)}"', 'class="group-fig"', "</section>")
        assert 'class="main-svg"' in fig, title
        drawn = re.findall(r'<path class="js-line" d="M[^"]+"', fig)
        assert len(drawn) >= len(keys), (title, len(drawn), keys)  # one line per panel at least
        for key in keys:
            assert f">{esc(key)}</text>" in fig, key  # the panel's title

    # the rollouts: the shown step (the last) displays an image inline and every row's reward values
    last = max(s["step"] for s in samples)
    steps = re.findall(r'<div class="step" data-step="(\d+)"( hidden="")?>', dom)
    assert [s for s, hidden in steps if not hidden] == [str(last)]
    shown = _between(dom, f'<div class="step" data-step="{last}">', '<div class="step"', "</section>")
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', shown)
    rows = [s for s in samples if s["step"] == last]
    for row in rows:
        assert f'<td class="num reward">{fmt_reward(row["reward"])}</td>' in shown
        assert f">{fmt_reward(row['advantage'])}</td>" in shown
        for key in ("reward/accuracy", "reward/answer_format"):
            assert f'<td class="num">{fmt_reward(row[key])}</td>' in shown
        assert f"<pre>{esc(row['completion'])}</pre>" in shown
    # the validation table (step 3) is on the page
    val = next(m for m in metrics if "val_accuracy" in m)
    assert f'<td class="num">{val["step"]}</td><td class="num">{val["val_accuracy"]:.4g}</td>' in dom

    shot = out.with_suffix(".png")
    chromium.run(out, f"--screenshot={shot}")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2000)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # drawn, not a blank page
    print(f"screenshot: {shot} ({shot.stat().st_size} bytes); report {out.stat().st_size} bytes;",
          json.dumps({t: len(k) for t, k in groups.items()}))
