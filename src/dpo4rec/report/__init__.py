"""The report: test metrics of every arm with paired bootstrap intervals, plots, report.md and metrics.json."""

from dpo4rec.report.report import write_report

__all__ = ["write_report"]
