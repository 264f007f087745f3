"""MLflow tracking: where runs go, how a run is opened and closed (the per-epoch logger: train_callbacks).

Why `MlflowClient` and not `ray.air.integrations.mlflow`: Ray Train V2 has no MLflow callback
(`../shared/notes/ray-2.60.md`), and `setup_mlflow` inside workers would log from every rank and
start a new run on each restart. A Train `UserCallback` runs on the controller, sees each report
exactly once (rank 0's), and logs with an explicit run id that survives worker restarts and
driver resumes. MLflow itself is the tracker; nothing here stores metrics of its own.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.sqlite_store import prepare_sqlite_store
from workers.uris import redact_text, redact_uri, split_credentials  # noqa: F401 - re-exported: avtune's one place


def resolve_tracking_uri(spec_uri: str | None, runs_dir: Path) -> str:
    """Spec field (or an API / CLI argument), then MLFLOW_TRACKING_URI, then a SQLite store under the runs
    folder. An http(s) URI comes back without its credentials, which move into MLflow's own variables in
    this process's environment (`split_credentials`; Ray workers started from here inherit them): every
    MLflow client, error text, run tag and MLflow's own "View run ... at" line then sees only the clean URI.
    A new SQLite store is copied from a migrated template (`orchestrator.sqlite_store`)."""
    for uri in (spec_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if uri:
            clean, credentials = split_credentials(uri)
            os.environ.update(credentials)
            if os.environ.get("MLFLOW_TRACKING_URI") == uri:
                os.environ["MLFLOW_TRACKING_URI"] = clean  # what MLflow itself would read next
            prepare_sqlite_store(clean)
            return clean
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{runs_dir / 'mlflow.db'}"
    prepare_sqlite_store(uri)
    return uri


def artifact_root(tracking_uri: str, runs_dir: Path) -> str | None:
    """Local stores keep artifacts under the runs folder; a server decides its own."""
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:"):
        return (Path(runs_dir).resolve() / "mlartifacts").as_uri()
    return None


# The MLflow UI (3.x) opens an experiment on its GenAI overview (traces) unless the experiment says it is a
# model-training one; with this kind it opens on the runs table. Values: `custom_model_development`,
# `genai_development`, ... (../shared/notes/mlflow-3.17.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training(client: MlflowClient, experiment) -> None:
    """Give an experiment (an `mlflow.entities.Experiment`) the model-training kind when it has none; a kind
    someone else set is kept."""
    if not (experiment.tags or {}).get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def get_or_create_experiment(client: MlflowClient, name: str, runs_dir: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        mark_model_training(client, exp)
        return exp.experiment_id
    location = artifact_root(client.tracking_uri, runs_dir)  # MlflowClient's public property: the URI it was made with
    if location:
        location = f"{location}/{name}"
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


DATA_CONTEXT = "training"
MANIFEST_COLUMNS = ["clip_id", "split", "label", "video", "audio"]


def data_manifest(layout: str, root: Path):
    """Every clip the layout's split lists give training, validation and test (`workers.layouts.read_layout`,
    the derived validation split included), as a DataFrame: clip id, split, label and the media paths
    relative to the root. Rows a split list cannot use are left out (the loader names them)."""
    import pandas as pd

    from workers.layouts import SPLITS, read_layout

    rows = []
    for split in SPLITS:
        found, _ = read_layout(Path(root), layout, split)
        rows += [(r.clip_id, split, r.label, r.video, r.audio) for r in found if r.problem is None]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def training_dataset(data):
    """The MLflow dataset a run trains on, from the spec's `data` section (root resolved), or None when
    there is no data folder to describe yet. Its DataFrame is the layout's manifest (`data_manifest`); its
    digest is an MD5 of the whole manifest (MLflow's own pandas digest reads only the first 10,000 rows)
    and, for generated clips, of the generator's card.json, which is then the source (otherwise the root).
    Name: `<layout>:<root folder name>`, `generated-<layout>:...` for generated clips."""
    import hashlib
    import warnings

    import mlflow.data

    if data.root is None:
        return None
    root = Path(data.root)
    generated = data.source == "generated"
    if generated and not (root / "card.json").is_file():
        return None
    frame = data_manifest(data.layout, root)
    digest = hashlib.md5(frame.to_csv(index=False).encode(), usedforsecurity=False)
    source = root
    if generated:
        source = root / "card.json"
        digest.update(source.read_bytes())
    name = f"{'generated-' if generated else ''}{data.layout}:{root.name}"
    with warnings.catch_warnings():  # MLflow 3.17 registers its local source twice and warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_pandas(frame, source=str(source), name=name, digest=digest.hexdigest()[:8])


def log_training_data(client: MlflowClient, run_id: str, data) -> None:
    """Log the run's data (`training_dataset`) as its MLflow dataset input, context "training": the runs
    table's Dataset column then names it. Called for every run avtune starts (`start_mlflow_run`)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = training_dataset(data)
    if dataset is None:
        return
    entity = Dataset(**dataset.to_dict())
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, DATA_CONTEXT)])])


def log_params_batched(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def log_summary_once(client: MlflowClient, run_id: str, values: dict[str, float]) -> None:
    """Step-0 summary metrics of a run (a sweep parent's), each point logged once: a value the run already
    has is skipped, so a resumed sweep or a second report adds no duplicate points."""
    current = client.get_run(run_id).data.metrics
    ts = int(time.time() * 1000)
    fresh = [Metric(k, float(v), ts, 0) for k, v in values.items() if current.get(k) != float(v)]
    for i in range(0, len(fresh), 500):
        client.log_batch(run_id, metrics=fresh[i : i + 500])


# Stopped by the user (Ctrl-C, `kill`), not failed: MLflow's KILLED.
INTERRUPTS = (KeyboardInterrupt, SystemExit)


def finish_run(client: MlflowClient, run_id: str, error: BaseException | None = None) -> None:
    """End a run with the state that tells the truth: FINISHED, KILLED (interrupted) or FAILED (with the
    error text in the `error` tag)."""
    if error is None:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    elif isinstance(error, INTERRUPTS):
        client.set_tag(run_id, "avtune.stopped_by", "interrupt")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    else:
        # A message may quote the URI of a client built outside avtune (the API): its secrets stay out of the tag.
        text = redact_text(f"{type(error).__name__}: {error}", client.tracking_uri)
        client.set_tag(run_id, "error", text[:5000])
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """A resumed run: RUNNING again, without the error or stop tag of the attempt it continues."""
    run = client.get_run(run_id)
    for tag in ("error", "avtune.stopped_by"):
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    client.update_run(run_id, status="RUNNING")
    mark_model_training(client, client.get_experiment(run.info.experiment_id))  # an experiment from before the kind


def metric_history_frame(client: MlflowClient, run_id: str):
    """Per-epoch history of every metric of a run as a DataFrame indexed by epoch."""
    import pandas as pd

    run = client.get_run(run_id)
    columns: dict[str, dict[int, float]] = {}
    for key in run.data.metrics:
        columns[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "step"
    return frame
