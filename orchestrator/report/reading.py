"""Reading many runs at once: their metric histories and one artifact file of each.

A report of 1,000 runs read one ``get_metric_history`` per run and key and one ``get_run`` inside every
``download_artifacts`` (~71 SQL statements per run). Here a history key costs one query for all runs where
the store allows it (MLflow's SQL store), the artifact location comes from the search that found the runs,
and the downloads run side by side. Nothing is cached: each call reads what the store holds now, so two
reports of a running sweep never disagree with it.
"""
from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

# Run ids per bulk history query: far below SQLite's limit on bound variables (32,766), and a page of
# 500 runs x ~100 epochs stays a few MB.
BULK_RUNS = 500
# Downloads at once: they wait on files or HTTP, not on the CPU.
DOWNLOAD_THREADS = 8


def _sql_store(client: MlflowClient):
    """The client's store when it answers a history query for many runs (MLflow's SQL store), else None.
    MlflowClient exposes no bulk history call; its store (a private attribute) does on SQL back ends."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if callable(getattr(store, "get_metric_history_bulk", None)) else None


def _bulk_values(store, run_ids: list[str], key: str) -> dict[str, dict[int, float]]:
    """run_id -> {step: value} of `key`, one query per BULK_RUNS runs. Within a step the last logged value
    wins, as in a per-run read sorted by timestamp."""
    out: dict[str, dict[int, float]] = {}
    for i in range(0, len(run_ids), BULK_RUNS):
        # No row limit: the store applies `max_results` to the whole answer, not per run.
        rows = store.get_metric_history_bulk(run_ids[i : i + BULK_RUNS], key, max_results=None)
        for row in rows:
            out.setdefault(row.run_id, {})[row.step] = row.value  # a MetricWithRunId is a Metric
    return out


def _one_run_values(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, dict[int, float]]:
    """As `_bulk_values` through the client, one request per run, side by side (an HTTP tracking server)."""
    def read(run_id: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        return dict(zip(run_ids, pool.map(read, run_ids)))


def metric_histories(client: MlflowClient, runs: Iterable[Run], keys: Iterable[str]) -> dict[str, pd.DataFrame]:
    """run_id -> its per-epoch values of `keys` (columns; index `epoch`, sorted), only the keys the run logged
    (its latest metrics say which); an empty frame for a run that logged none of them."""
    runs = list(runs)
    wanted = {r.info.run_id: [k for k in keys if k in r.data.metrics] for r in runs}
    store = _sql_store(client)
    columns: dict[str, dict[str, dict[int, float]]] = {run_id: {} for run_id in wanted}
    for key in dict.fromkeys(k for ks in wanted.values() for k in ks):
        run_ids = [run_id for run_id, ks in wanted.items() if key in ks]
        values = _bulk_values(store, run_ids, key) if store is not None else _one_run_values(client, run_ids, key)
        for run_id in run_ids:
            columns[run_id][key] = values.get(run_id, {})
    return {run_id: _frame(columns[run_id], wanted[run_id]) for run_id in wanted}


def _frame(columns: dict[str, dict[int, float]], keys: list[str]) -> pd.DataFrame:
    """One run's history as a frame (built from lists: a frame from a dict of dicts costs ~10x more, which a
    thousand runs feel)."""
    if not keys:
        return pd.DataFrame()
    steps = sorted(set().union(*(columns[k] for k in keys)))
    data = {k: [columns[k].get(step, math.nan) for step in steps] for k in keys}
    return pd.DataFrame(data, index=pd.Index(steps, name="epoch", dtype="int64"), dtype=float)


def _local_copy(run: Run, name: str, tracking_uri: str, tmp: str) -> str | None:
    """A local path of the run's artifact `name`: the file itself in a local artifact store, else a download
    into `tmp`; None when the run has no such file."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    try:
        repo = get_artifact_repository(artifact_uri=run.info.artifact_uri, tracking_uri=tracking_uri)
        if isinstance(repo, LocalArtifactRepository):
            path = repo.download_artifacts(name)  # no copy: the store's own file
            return path if os.path.isfile(path) else None
        os.makedirs(folder := os.path.join(tmp, run.info.run_id), exist_ok=True)
        return repo.download_artifacts(name, folder)
    except Exception:  # noqa: BLE001 - no such artifact (an older or foreign run): the caller's fallback applies
        return None


def artifact_files(client: MlflowClient, runs: Iterable[Run], name: str,
                   read: Callable[[str, str], Any]) -> dict[str, Any]:
    """run_id -> `read(local path, run_id)` of each run's artifact `name`, None where the run has none.
    Downloads run side by side; an error of `read` itself (a damaged file) is raised, naming what it names."""
    runs = list(runs)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        paths = list(pool.map(lambda run: _local_copy(run, name, client.tracking_uri, tmp), runs))
        return {run.info.run_id: (read(path, run.info.run_id) if path is not None else None)
                for run, path in zip(runs, paths)}


def artifact_bytes(client: MlflowClient, runs: Iterable[Run], name: str) -> dict[str, bytes | None]:
    """run_id -> the bytes of the run's artifact `name` (None where it has none), read side by side: for a parser
    that reads many runs' files in one pass (`comparisons.parse_predictions`)."""
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    runs = list(runs)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        data = list(pool.map(lambda run: read(_local_copy(run, name, client.tracking_uri, tmp)), runs))
    return {run.info.run_id: d for run, d in zip(runs, data)}

