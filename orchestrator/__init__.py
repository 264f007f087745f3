"""avtune orchestrator: specs, Ray Train / Tune wiring, MLflow tracking, the Python API and the CLI.

    from orchestrator import load_spec, run_training
    result = run_training(load_spec("experiments/quick.yaml"))
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_spec", "run_training", "build_report", "ExperimentSpec", "SpecError", "TrainingResult"]


def __getattr__(name: str) -> Any:
    # Lazy so `avtune --help` does not pay for importing ray, torch and mlflow.
    if name in ("load_spec", "ExperimentSpec", "SpecError"):
        from orchestrator import specs

        return getattr(specs, name)
    if name in ("run_training", "TrainingResult"):
        from orchestrator import training

        return getattr(training, name)
    if name == "build_report":
        from orchestrator import report

        return report.build_report
    raise AttributeError(name)
