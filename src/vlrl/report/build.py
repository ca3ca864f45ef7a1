"""`vlrl report RUN_DIR [--out FILE.html]`: one static HTML file that shows a run (or a folder of runs).

Sections, each only when the run has something for it:
    Runs         each run's folder, metrics lines, steps, rollout rows (and the colour of its curves)
    Summary      the folder's summary.json (`make demo`) / report.json (`vlrl curate`) as tables
    Curves       every metric of metrics.jsonl, grouped by stage (`vlrl.report.groups`), a panel per metric,
                 every run of the folder in the same panel
    Validation   val_* per step (val_accuracy overall and per task), a table per run
    Evaluation   accuracy per task of the `vlrl eval` results files in the folder (or, for a single run, its
                 parent: `runs/demo/eval/*.json` beside `runs/demo/rl`) and their `eval/` sub-folders
    Rollouts     samples.jsonl per step (a step selector): each prompt's image(s) inline, its text, the answer,
                 and per completion the total reward, each reward and the advantage

The file needs nothing beside it and no network: plotly.js is embedded (most of the file's ~5 MB) and the
images are thumbnails inlined as data URLs. Text from run files is HTML-escaped (`vlrl.report.page`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from vlrl.report.groups import group_metrics, metric_keys
from vlrl.report.images import ImageInliner
from vlrl.report.page import (
    esc,
    eval_table,
    page,
    rollouts_section,
    runs_table,
    slug,
    summary_tables,
    swatch,
    validation_table,
)
from vlrl.report.plots import group_figure, plotly_js, require_plotly, run_colors
from vlrl.report.runs import Run, eval_results, find_runs, load_run, summaries, validation_rows

REPORT = "report.html"
MAX_ROLLOUT_STEPS = 30  # steps of samples.jsonl in the rollout browser (evenly spread, first and last kept)


def curves_section(runs: list[Run]) -> str:
    colors = run_colors(runs)
    keys: dict[str, None] = {}
    for run in runs:
        keys.update((k, None) for k in metric_keys(run.metrics))
    parts = []
    if len(runs) > 1:
        parts.append('<p class="note">' + " ".join(f"{swatch(colors[r.name])}{esc(r.name)}" for r in runs) + "</p>")
    for title, group in group_metrics(keys).items():
        parts.append(f'<div class="group-fig" id="group-{slug(title)}"><h3>{esc(title)}</h3>'
                     f"{group_figure(group, runs, f'plot-{slug(title)}')}</div>")
    return "\n".join(parts) or '<p class="note">No metrics logged yet.</p>'


def build_report(root: Path, runs: list[Run], title: str, max_steps: int = MAX_ROLLOUT_STEPS) -> str:
    """The page of `runs` (found at `root`); results and summaries are read from `root` (and, when `root` is a
    single run, from its parent too)."""
    require_plotly()  # before any work: missing plotting says how to install it
    single = len(runs) == 1 and runs[0].path.resolve() == root.resolve()
    colors = run_colors(runs)
    sections = [("runs", "Runs", runs_table(runs, colors))]
    found = summaries(root)
    if found:
        sections.append(("summary", "Summary", "\n".join(summary_tables(n, d) for n, d in found.items())))
    sections.append(("curves", "Curves", curves_section(runs)))
    val = [(run, *validation_rows(run)) for run in runs]
    if any(rows for _, _, rows in val):
        sections.append(("validation", "Validation", "\n".join(
            f"<h3>{esc(run.name)}</h3>{validation_table(cols, rows)}" for run, cols, rows in val if rows)))
    results = eval_results([root, root.parent] if single else [root])
    if results:
        sections.append(("eval", "Evaluation", eval_table(results)))
    with_samples = [run for run in runs if run.samples]
    if with_samples:
        inliner = ImageInliner(base=root)
        sections.append(("rollouts", "Rollouts", "\n".join(
            rollouts_section(run, i, inliner, max_steps) for i, run in enumerate(with_samples))))
    subtitle = f"{root.resolve()} · written {time.strftime('%Y-%m-%d %H:%M:%S')} by vlrl report"
    return page(title, subtitle, sections, plotly_js())


def write_report(run_dir: str | Path, out: str | Path | None = None, *, runs: Mapping[str, str | Path] | None = None,
                 title: str | None = None, max_steps: int = MAX_ROLLOUT_STEPS) -> Path:
    """Write the report of `run_dir` (a run, or a folder of runs) to `out` (default `run_dir/report.html`).
    `runs` ({name: folder}) picks and names the runs to compare instead of finding them in `run_dir`.
    Raises ImportError (with the install command) when plotly is missing, FileNotFoundError when `run_dir`
    holds no run."""
    root = Path(run_dir)
    require_plotly()
    if runs is not None:
        found = [load_run(Path(p), name) for name, p in runs.items() if (Path(p) / "metrics.jsonl").is_file()]
        if not found:
            raise FileNotFoundError(f"none of {', '.join(map(str, runs.values()))} holds a metrics.jsonl")
    else:
        found = find_runs(root)
    path = Path(out) if out is not None else root / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(root, found, title or f"vlrl report: {root.resolve().name}", max_steps),
                    encoding="utf-8")
    return path
