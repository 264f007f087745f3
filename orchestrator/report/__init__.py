"""Imbalance analysis of a sweep, from MLflow alone: utilisation, balance, plots and an HTML report.

``analysis`` reads the sweep and computes (its docstring defines utilisation, balance and the
dominant modality), ``comparisons`` gives every compared number its interval and paired test
(``stats`` holds the formulas), ``references`` the uni-modal ensemble, the ceiling and the headroom
each configuration recovers, ``plots`` draws, ``html`` writes the page (``build_report``).
"""
from __future__ import annotations

from orchestrator.report.analysis import (SweepData, findings, imbalance_summary, load_sweep, log_sweep_imbalance,
                                          resolve_sweep, utilisation)
from orchestrator.report.comparisons import config_summary
from orchestrator.report.html import build_report, default_report_dir

__all__ = ["SweepData", "build_report", "config_summary", "default_report_dir", "findings", "imbalance_summary", "load_sweep",
           "log_sweep_imbalance", "resolve_sweep", "utilisation"]
