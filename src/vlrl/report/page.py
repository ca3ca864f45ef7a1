"""The report's HTML: tables, the rollout browser and the page around the figures.

Every string that comes from a run file (metric names, ids, prompts, completions, answers, paths, summary
keys) goes through `esc` before it reaches the page; the page's one script is a constant that reads only the
DOM (it never receives run data), so nothing from a run can become markup or code.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlrl.report.images import ImageInliner
from vlrl.report.runs import Run

NO_VALUE = "–"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    """A cell's text: floats to 4 significant digits, None (not scored / not finite) as a dash."""
    if v is None:
        return NO_VALUE
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        head = ", ".join(fmt(x) for x in v[:20])
        return head + (f", … ({len(v)} in all)" if len(v) > 20 else "")
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def fmt_reward(v: Any) -> str:
    """A reward or advantage in the rollout tables: 3 decimals, so a group's values line up."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.3f}"
    return fmt(v)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def table(columns: list[str], rows: Iterable[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(v: Any) -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{esc(fmt(v))}</td>' if num else f"<td>{esc(fmt(v))}</td>"


def swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{esc(color)}"></span>'


# ---- tables of the run directory's files ------------------------------------------------------------------


def runs_table(runs: list[Run], colors: dict[str, str]) -> str:
    """Each run's folder and what it holds; with several runs, the colour of its curves beside its name."""
    columns = ["run", "directory", "metrics lines", "steps", "rollout rows", "unreadable lines"]
    body = []
    for run in runs:
        steps = [m["step"] for m in run.metrics if isinstance(m.get("step"), int)]
        span = f"{steps[0]}–{steps[-1]}" if steps else NO_VALUE
        key = swatch(colors[run.name]) if len(runs) > 1 else ""
        cells = "".join(_cell(v) for v in (str(run.path), len(run.metrics), span, len(run.samples), run.skipped))
        body.append(f"<tr><td>{key}{esc(run.name)}</td>{cells}</tr>")
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def summary_tables(name: str, data: dict[str, Any]) -> str:
    """A summary file (the demo's summary.json, curation's report.json) as tables side by side: each mapping of
    mappings first (such as the demo's per-task results, a column per inner key), then its scalars, then each
    other mapping (key, value)."""
    wide, narrow = [], []
    for key, value in data.items():
        if not isinstance(value, dict) or not value:
            continue
        if all(isinstance(v, dict) for v in value.values()):
            cols: dict[str, None] = {}
            for v in value.values():
                cols.update((c, None) for c in v)
            wide.append(_card(key, table([key, *cols], ([k, *(v.get(c) for c in cols)] for k, v in value.items()))))
        else:
            narrow.append(_card(key, table(["key", "value"], ([k, v] for k, v in value.items()))))
    scalars = [[k, v] for k, v in data.items() if not isinstance(v, dict)]
    if scalars:
        narrow.insert(0, _card("values", table(["key", "value"], scalars)))
    return f'<h3>{esc(name)}</h3><div class="cards">{"".join(wide + narrow)}</div>'


def _card(title: str, inner: str) -> str:
    return f'<div class="card"><h4>{esc(title)}</h4>{inner}</div>'


def validation_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    return f'<div class="scroll">{table(columns, ([r.get(c) for c in columns] for r in rows))}</div>'


def eval_table(results: dict[str, dict[str, Any]]) -> str:
    """Accuracy (%) per task of each eval results file (a column each), overall first; then each file's model."""
    tasks: dict[str, None] = {}
    for res in results.values():
        tasks.update((t, None) for t in res.get("by_task") or {})

    def pct(row: Any) -> Any:
        acc = row.get("accuracy") if isinstance(row, dict) else None
        return f"{100 * acc:.1f}" if isinstance(acc, (int, float)) else None

    rows = [["all", *(f"{pct(r)} (n={r.get('n')})" for r in results.values())]]
    rows += [[t, *(pct((r.get("by_task") or {}).get(t)) for r in results.values())] for t in tasks]
    models = table(["results", "model", "n", "seconds"],
                   ([name, r.get("model", NO_VALUE), r.get("n"), r.get("seconds")] for name, r in results.items()))
    return table(["task", *results], rows) + models


# ---- the rollout browser ----------------------------------------------------------------------------------


def pick_steps(steps: list[int], k: int) -> list[int]:
    """At most `k` of `steps` (sorted), evenly spread, the first and the last always among them."""
    if k <= 0 or len(steps) <= k:
        return steps
    if k == 1:
        return [steps[-1]]
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def rollouts_section(run: Run, index: int, inliner: ImageInliner, max_steps: int) -> str:
    """A step selector (the last step shown first) and, per chosen step, each prompt group: its image(s), its
    prompt, its answer, then a row per completion with the total reward, each reward and the advantage."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in run.samples:
        by_step.setdefault(row["step"], []).append(row)
    steps = pick_steps(sorted(by_step), max_steps)
    reward_keys: dict[str, None] = {}
    for row in run.samples:
        reward_keys.update((k, None) for k in row if k.startswith("reward/"))
    box = f"rollouts-{index}"
    options = "".join(f'<option value="{s}"{" selected" if s == steps[-1] else ""}>step {s}</option>' for s in steps)
    note = f"{len(steps)} of {len(by_step)} logged steps" if len(steps) < len(by_step) else f"{len(steps)} logged steps"
    parts = [f'<div class="rollouts" id="{box}"><h3>{esc(run.name)}</h3>',
             f'<div class="stepbar"><button type="button" data-move="-1" title="previous step">◀</button>'
             f'<select aria-label="step">{options}</select>'
             f'<button type="button" data-move="1" title="next step">▶</button>'
             f'<span class="note">{note}; {len(run.samples)} rows in samples.jsonl</span></div>']
    if not any("images" in r or "prompt" in r for r in run.samples):
        parts.append('<p class="note">This samples.jsonl has no images or prompts (written before vlrl '
                     "recorded them): completions and rewards only.</p>")
    for s in steps:
        rows = sorted(by_step[s], key=lambda r: r.get("row", 0))
        hidden = "" if s == steps[-1] else " hidden"
        parts.append(f'<div class="step" data-step="{s}"{hidden}>')
        parts += [_prompt_group(group, list(reward_keys), inliner) for group in _groups(rows)]
        parts.append("</div>")
    parts.append("</div>")
    return "\n".join(parts)


def _groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive rows of one prompt (GRPO's group) together."""
    out: list[list[dict[str, Any]]] = []
    for row in rows:
        if out and out[-1][0].get("id") == row.get("id"):
            out[-1].append(row)
        else:
            out.append([row])
    return out


def _images(paths: Any, inliner: ImageInliner) -> str:
    if isinstance(paths, str):
        paths = [paths]
    figs = []
    for p in paths if isinstance(paths, list) else []:
        url = inliner.url(str(p))
        if url is None:
            figs.append(f'<div class="noimage">image not readable<br><code>{esc(p)}</code></div>')
        else:  # a data: URL built here from the image's bytes (base64): nothing of the run's text in it
            figs.append(f'<figure><img src="{url}" alt="{esc(p)}"><figcaption>{esc(Path(str(p)).name)}</figcaption>'
                        "</figure>")
    return f'<div class="images">{"".join(figs)}</div>' if figs else ""


def _sign(v: Any) -> str:
    """The class that colours an advantage: pos (reinforced), neg (discouraged), none for 0 or no value."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v == 0:
        return ""
    return "pos" if v > 0 else "neg"


def _prompt_group(rows: list[dict[str, Any]], reward_keys: list[str], inliner: ImageInliner) -> str:
    first = rows[0]
    prompt = first.get("prompt")
    head = [_images(first.get("images", []), inliner), '<div class="prompt">',
            f'<div class="meta">id <code>{esc(first.get("id", NO_VALUE))}</code> · answer '
            f'<code>{esc(first.get("answer", NO_VALUE))}</code></div>']
    if isinstance(prompt, str):
        head.append(f'<pre class="prompt-text">{esc(prompt)}</pre>')
    head.append("</div>")
    columns = ["row", "completion", "reward", *(k.removeprefix("reward/") for k in reward_keys), "advantage", "length"]
    body = []
    for r in rows:
        adv = r.get("advantage")
        sign = _sign(adv)
        cut = ' <span class="badge">truncated</span>' if r.get("truncated") else ""
        cells = [f'<td class="num">{esc(fmt(r.get("row")))}</td>',
                 f'<td class="completion"><pre>{esc(r.get("completion", ""))}</pre>{cut}</td>',
                 f'<td class="num reward">{esc(fmt_reward(r.get("reward")))}</td>',
                 *(f'<td class="num">{esc(fmt_reward(r.get(k)))}</td>' for k in reward_keys),
                 f'<td class="num adv {sign}">{esc(fmt_reward(adv))}</td>',
                 f'<td class="num">{esc(fmt(r.get("length")))}</td>']
        body.append("<tr>" + "".join(cells) + "</tr>")
    head_row = "".join(f"<th>{esc(c)}</th>" for c in columns)
    return (f'<div class="group"><div class="group-head">{"".join(head)}</div>'
            f'<table class="completions"><thead><tr>{head_row}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            "</div>")


# ---- the page ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .meta{opacity:.75;font-size:12px;margin:4px 0 0}nav a{color:#93c5fd;margin-right:14px;font-size:13px}
main{padding:8px 24px 40px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{margin:18px 0 6px}h4{margin:12px 0 4px;font-size:13px;color:#444}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}
th,td{border:1px solid #e3e3e3;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f1f3f5}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:0 18px;align-items:flex-start}
.scroll{max-height:360px;overflow:auto;display:inline-block}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.group-fig{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px 8px;margin:10px 0}
.stepbar{display:flex;gap:8px;align-items:center;margin:8px 0}.note{color:#666;font-size:12px}
.group{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:10px;margin:10px 0}
.group-head{display:flex;gap:14px;align-items:flex-start}.images{display:flex;gap:8px;flex-wrap:wrap}
figure{margin:0}figure img{min-height:140px;max-width:320px;max-height:320px;object-fit:contain;border:1px solid #ddd}
figcaption{font-size:11px;color:#666}.noimage{width:160px;padding:20px 8px;border:1px dashed #c00;color:#a00;
font-size:12px;word-break:break-all;background:#fff5f5}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
.prompt-text{background:#f6f8fa;padding:6px;border-radius:4px;max-width:720px}
.completions{width:100%}.completion{min-width:280px}.adv.pos{color:#067d17}.adv.neg{color:#b00020}
.badge{font-size:11px;background:#fde68a;border-radius:3px;padding:0 4px}
"""

# The page's only script: the step selector of each rollout browser. It reads the DOM, never run data.
SCRIPT = """
(function () {
  document.querySelectorAll('.rollouts').forEach(function (box) {
    var sel = box.querySelector('select');
    var steps = box.querySelectorAll('.step');
    function show() {
      steps.forEach(function (s) { s.hidden = s.getAttribute('data-step') !== sel.value; });
    }
    sel.addEventListener('change', show);
    box.querySelectorAll('button[data-move]').forEach(function (b) {
      b.addEventListener('click', function () {
        var i = sel.selectedIndex + Number(b.getAttribute('data-move'));
        if (i >= 0 && i < sel.options.length) { sel.selectedIndex = i; show(); }
      });
    });
    show();
  });
})();
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], plotly_js: str) -> str:
    """The whole document: `sections` are (id, heading, inner HTML), plotly.js inline in the head (the figures'
    scripts call it as the page loads)."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{esc(sid)}"><h2>{esc(head)}</h2>\n{inner}\n</section>' for sid, head, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style>\n<script>{plotly_js}</script>\n</head>\n"
            f'<body><header><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)}</p><nav>{nav}</nav></header>\n'
            f"<main>\n{body}\n</main>\n<script>{SCRIPT}</script>\n</body></html>\n")
