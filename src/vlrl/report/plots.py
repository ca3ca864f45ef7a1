"""The curves, drawn by plotly (an optional extra: `pip install 'vlrl[report]'`).

One figure per metric group, one small panel per metric, one trace per run in every panel (a folder of runs is
compared side by side: the same metric of each stage in the same panel, one colour per run). Titles and trace
names come from run files, so they are HTML-escaped: plotly renders a subset of HTML in text (links among it);
plotly itself escapes `<`, `>` and `/` in the JSON it embeds in the page's scripts.
"""

from __future__ import annotations

import html
import math
from typing import Any

from vlrl.report.groups import X_KEY, is_metric_value
from vlrl.report.runs import Run

INSTALL = "pip install 'vlrl[report]'  (or: pip install plotly)"
COLUMNS = 3
PANEL_HEIGHT = 230  # px per row of panels
MAX_POINTS = 4000  # per trace: a longer curve is thinned to every k-th point (the last one kept)
SMOOTH_ABOVE = 40  # points: a longer curve is drawn faint with its moving average over it (as TensorBoard does)
SMOOTHING = 0.85  # the moving average's weight of the past (TensorBoard's smoothing slider)
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def require_plotly() -> Any:
    """The plotly module; an ImportError that says how to install it when it is missing."""
    try:
        import plotly
    except ImportError as exc:
        raise ImportError(f"the run report draws its curves with plotly, which is not installed: {INSTALL}") from exc
    return plotly


def plotly_js() -> str:
    """plotly.js itself, embedded once in the page (the page must open with no network)."""
    require_plotly()
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def series(run: Run, key: str) -> tuple[list[Any], list[Any]]:
    """(steps, values) of `key` over the run's metrics lines that have it, thinned to MAX_POINTS."""
    pts = [(m[X_KEY], m[key]) for m in run.metrics if key in m and is_metric_value(m[key]) and X_KEY in m]
    if len(pts) > MAX_POINTS:
        k = math.ceil(len(pts) / MAX_POINTS)
        pts = pts[::k] if (len(pts) - 1) % k == 0 else [*pts[::k], pts[-1]]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: list[Any], weight: float = SMOOTHING) -> list[Any]:
    """TensorBoard's debiased exponential moving average; a None (a non-finite value) stays a gap."""
    out: list[Any] = []
    acc, norm = 0.0, 0.0
    for v in values:
        if v is None:
            out.append(None)
            continue
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def run_colors(runs: list[Run]) -> dict[str, str]:
    """{run name: its line colour}, the same in every figure (the page prints the key once, above them)."""
    palette = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def group_figure(keys: list[str], runs: list[Run], div_id: str) -> str:
    """The HTML (a div and its plotting script, no plotly.js) of one group's figure."""
    require_plotly()
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = min(COLUMNS, len(keys))
    rows = math.ceil(len(keys) / cols)
    height = PANEL_HEIGHT * rows + 60
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[html.escape(k) for k in keys],
                        horizontal_spacing=0.07, vertical_spacing=min(60 / height, 0.9 / max(rows - 1, 1)))
    colors = run_colors(runs)
    for i, key in enumerate(keys):
        for run in runs:
            x, y = series(run, key)
            if not x:
                continue
            name, label = html.escape(run.name), html.escape(key)
            color, many = colors[run.name], len(x) > SMOOTH_ABOVE
            where = {"row": i // cols + 1, "col": i % cols + 1}
            fig.add_trace(go.Scatter(
                x=x, y=y, name=name, mode="lines" if many else "lines+markers", showlegend=False,
                line={"color": color, "width": 1 if many else 1.5}, marker={"size": 4}, opacity=0.3 if many else 1,
                hovertemplate=f"{name}<br>step %{{x}}<br>{label} = %{{y:.4g}}<extra></extra>"), **where)
            if many:
                fig.add_trace(go.Scatter(
                    x=x, y=smooth(y), name=f"{name} (smoothed)", mode="lines", showlegend=False,
                    line={"color": color, "width": 1.8}, hoverinfo="skip"), **where)
    fig.update_annotations(font_size=12)
    steps = [m[X_KEY] for run in runs for m in run.metrics if isinstance(m.get(X_KEY), (int, float))]
    if steps and max(steps) - min(steps) <= 12:  # a short run: whole steps only (no tick at step 1.5)
        fig.update_xaxes(dtick=1)
    fig.update_layout(template="plotly_white", height=height, margin={"l": 50, "r": 20, "t": 48, "b": 30},
                      hovermode="closest")
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG,
                           default_width="100%", default_height=f"{height}px"))
