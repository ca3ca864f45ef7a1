"""Human-readable tables of evaluation results."""

from __future__ import annotations

from typing import Any


def print_result(summary: dict[str, Any]) -> None:
    """Accuracy overall and per category; with several samples per item, pass@1 and pass@n as well."""
    k = summary.get("samples_per_item", 1)

    def passes(row: dict[str, Any]) -> str:
        return f"  pass@1={row['pass_at_1']:.4f} pass@{k}={row['pass_at_n']:.4f}" if k > 1 else ""

    print(f"accuracy {summary['accuracy']:.4f} on {summary['n']} items{passes(summary)}  "
          f"(predictions: {summary['predictions']})")
    for name, row in summary.get("by_category", {}).items():
        print(f"  {name:<28} n={row['n']:<6} accuracy={row['accuracy']:.4f}{passes(row)}")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table; floats printed as percentages."""
    def cell(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
