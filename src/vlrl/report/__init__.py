"""The run report: one self-contained HTML page of a run directory's curves, tables and rollouts
(`vlrl report RUN_DIR`, written by `make demo` as `runs/demo/report.html`); see `vlrl.report.build`."""

from vlrl.report.build import build_report, write_report

__all__ = ["build_report", "write_report"]
