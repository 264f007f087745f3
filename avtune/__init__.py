"""avtune's programmatic API: load a spec, train it, sweep it, read a sweep's trials, build its report.

    import avtune

    spec = avtune.load_spec("experiments/quick.yaml", ["method.alpha=0.3"])
    result = avtune.run_training(spec)                  # one Ray Train run, tracked in MLflow
    sweep = avtune.run_sweep(avtune.load_spec("experiments/demo.yaml"))
    trials = avtune.results("demo")                     # the latest sweep's trials, a pandas DataFrame
    report = avtune.build_report("demo")                # path of its report.html

Works from a plain script (no ``if __name__ == "__main__":`` guard needed) and from a notebook:
nothing here starts a process that re-imports the caller's main module. ``import avtune`` is light:
torch, Ray, MLflow and pandas are imported only when a function that needs them is called (each
function imports its implementation from ``orchestrator`` on first use).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # names for the annotations only; importing them would load torch, Ray and MLflow
    import pandas as pd

    from orchestrator.sweep import SweepResult
    from orchestrator.training import TrainingResult
    from workers.specs import ExperimentSpec

__all__ = ["load_spec", "run_training", "run_sweep", "results", "build_report"]


def load_spec(path_or_data: str | os.PathLike[str] | dict[str, Any],
              overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Load and validate an experiment spec, then apply ``key=value`` overrides.

    Args:
        path_or_data: a YAML file (read with the safe loader) or the spec as a dict.
        overrides: dotted-path assignments such as ``"method.alpha=0.3"`` or ``"model.fusion=film"``,
            the ``--set`` of the CLI.

    Returns:
        The validated :class:`workers.specs.ExperimentSpec` (pydantic; torch-free).

    Raises:
        workers.specs.SpecError: the file cannot be read or parsed, or a field is invalid (the message
            names the field path and its allowed values).
    """
    from workers.specs import load_spec as _load_spec

    source = path_or_data if isinstance(path_or_data, dict) else Path(path_or_data)
    return _load_spec(source, overrides)


def run_training(spec: ExperimentSpec, address: str | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 resume_run_id: str | None = None) -> TrainingResult:
    """Train one spec under Ray Train and track it in MLflow; return when the run has finished.

    Generated data (``data.source: generated``) is synthesised on first use (in threads of this
    process). Ray: started locally in this process unless `address` (or ``RAY_ADDRESS``) names a
    cluster; a second call reuses the running Ray.

    Args:
        spec: the experiment, from :func:`load_spec`.
        address: Ray cluster address (``ray://...``, ``auto``, ``HOST:PORT``); None: local Ray.
        on_epoch: called with each epoch's metrics as they reach MLflow.
        resume_run_id: continue this interrupted MLflow run from its latest checkpoint.

    Returns:
        :class:`orchestrator.training.TrainingResult`: ``run_id``, ``experiment_id``,
        ``tracking_uri``, final ``metrics``, ``checkpoint_path`` and ``history`` (a pandas DataFrame,
        one row per epoch).
    """
    from orchestrator.training import run_training as _run_training

    return _run_training(spec, address=address, on_epoch=on_epoch, resume_run_id=resume_run_id)


def run_sweep(spec: ExperimentSpec, address: str | None = None, max_concurrent: int | None = None,
              resume: bool | str = False) -> SweepResult:
    """Run the spec's ``search`` as Ray Tune trials: one MLflow parent run, a child run per trial.

    Args:
        spec: an experiment with a ``search`` section, from :func:`load_spec`.
        address: Ray cluster address; None: local Ray (``RAY_ADDRESS`` when set).
        max_concurrent: trials at once (default: ``search.max_concurrent_trials``).
        resume: True continues this spec's interrupted sweep; a parent run id continues that sweep.

    Returns:
        :class:`orchestrator.sweep.SweepResult`: ``parent_run_id``, ``experiment_id``,
        ``tracking_uri``, ``experiment_path``, ``result_grid`` (Ray's ResultGrid), ``trials`` (a pandas
        DataFrame, best ``search.metric`` first; the same table :func:`results` reads back later) and
        ``gblend_weights``.

    Raises:
        workers.specs.SpecError: the spec has no ``search`` section or an invalid one.
    """
    from orchestrator.sweep import run_sweep as _run_sweep

    return _run_sweep(spec, address=address, max_concurrent=max_concurrent, resume=resume)


def results(experiment: str, sweep_run_id: str | None = None, *, tracking_uri: str | None = None,
            runs_dir: str | os.PathLike[str] = "runs", metric: str = "acc", mode: str = "max") -> pd.DataFrame:
    """The trials table of a sweep, read back from MLflow: what ``avtune results`` prints.

    Args:
        experiment: MLflow experiment name (``tracking.experiment``, else the spec's ``name``).
        sweep_run_id: the sweep's parent run id; None: the experiment's latest sweep.
        tracking_uri: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI``, else the SQLite store
            ``<runs_dir>/mlflow.db``.
        runs_dir: the local runs folder (``storage.runs_dir`` of the spec) holding the SQLite store.
        metric, mode: rows sorted by this final metric, best first (``mode``: ``max`` or ``min``).

    Returns:
        One row per main-stage trial (child run): ``run_id``, ``run_name``, ``status``, ``method``,
        ``alpha``, ``window``, ``fusion``, ``seed``, the final accuracies (``acc``, ``acc_audio``,
        ``acc_visual``, ``test_*``), ``gap_av`` and the other columns of
        :func:`orchestrator.runs.trial_row`. Empty (with those columns) when no trial has started.

    Raises:
        ValueError: the experiment, or the sweep in it, is not found at the tracking URI.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode: must be 'max' or 'min', got {mode!r}")
    from mlflow.tracking import MlflowClient

    from orchestrator.report import resolve_sweep
    from orchestrator.runs import trials_frame
    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri, Path(runs_dir)))
    return trials_frame(client, resolve_sweep(client, experiment, sweep_run_id), metric, mode)


def build_report(experiment: str, sweep_run_id: str | None = None, *, tracking_uri: str | None = None,
                 runs_dir: str | os.PathLike[str] = "runs", out_dir: str | os.PathLike[str] | None = None,
                 log_to_mlflow: bool = True) -> Path:
    """Write a sweep's imbalance report (plots, intervals, paired tests, findings) from MLflow alone.

    Args:
        experiment: MLflow experiment name.
        sweep_run_id: the sweep's parent run id; None: the experiment's latest sweep.
        tracking_uri: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI``, else ``<runs_dir>/mlflow.db``.
        runs_dir: the local runs folder (the SQLite store and the default output folder).
        out_dir: where the files go; None: ``<runs_dir>/reports/<experiment>-<run id prefix>``.
        log_to_mlflow: also log the report's files under ``report/`` on the sweep's parent run, and
            the utilisation metrics on its runs.

    Returns:
        The absolute path of ``report.html`` (self-contained, images embedded).

    Raises:
        ValueError: the experiment, or the sweep in it, is not found at the tracking URI.
    """
    from mlflow.tracking import MlflowClient

    from orchestrator.report import build_report as _build_report
    from orchestrator.report import default_report_dir, resolve_sweep
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, Path(runs_dir))
    sweep_run_id = resolve_sweep(MlflowClient(uri), experiment, sweep_run_id)
    out = Path(out_dir) if out_dir is not None else default_report_dir(Path(runs_dir), experiment, sweep_run_id)
    return _build_report(experiment, sweep_run_id, uri, out_dir=out, log_to_mlflow=log_to_mlflow)
