"""Evaluation on test users with bootstrap intervals, report.md, plots and metrics.json."""

from dpo4rec.report.bootstrap import paired_bootstrap
from dpo4rec.report.report import write_report

__all__ = ["paired_bootstrap", "write_report"]
