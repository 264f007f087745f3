"""One training run: spec -> Ray Train `TorchTrainer` -> per-epoch metrics in an MLflow run."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.backend import BackendConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from orchestrator.runs import PREDICTIONS_FILE, PROBABILITIES_FILE, csv_safe, logged_params
from orchestrator.specs import ExperimentSpec, SpecError, dump_spec_yaml
from orchestrator.tracking import (
    finish_run,
    get_or_create_experiment,
    log_params_batched,
    log_training_data,
    metric_history_frame,
    reopen_run,
    redact_text,
    redact_uri,
    resolve_tracking_uri,
)
from orchestrator.synth import synthesize_dataset
from orchestrator.train_callbacks import MlflowEpochLogger, ReleaseLeftPlacementGroups
from workers.methods import get_method
from workers.methods.base import is_run_id
from workers.evaluation import PREDICTION_COLUMNS
from workers.train_loop import CHECKPOINT_FILE, train_loop_per_worker


@dataclass
class TrainingResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str | None
    history: pd.DataFrame = field(repr=False)


# Ray Train starts a PreemptionWatcher actor for every run, which polls Ray Core for node drains (spot
# preemption on a cluster). The one local node avtune starts is never drained, and the actor costs
# ~1.5 CPU-s per run on 2 cores (measured: its process start and its `ray.data` imports). Off there
# only, unless the user set it; a cluster (`--address`) keeps Ray's default.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Set by start_local_ray for its own processes (the raylet and every Ray worker inherit it): this Ray has
# no dashboard, so no State API (see ClipTrainer).
EMBEDDED_RAY_ENV = "AVTUNE_EMBEDDED_RAY"


def start_local_ray(**init_kwargs: Any) -> None:
    """The embedded single-node Ray (no dashboard), with `LOCAL_RAY_ENV` as defaults."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ[EMBEDDED_RAY_ENV] = "1"
    ray.init(include_dashboard=False, **init_kwargs)


def connect_ray(address: str | None = None) -> None:
    """Local Ray started in-process unless an address (argument or RAY_ADDRESS) names a cluster.

    Token authentication stays as Ray sets it: a local `ray.init()` creates and uses the token;
    for a cluster, Ray reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=credentials_runtime_env())
    else:
        start_local_ray(log_to_driver=True)


# Ray Train V2 retries a worker group that did not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) as a
# controller failure, by default without limit: a request the cluster can never meet waited forever. Bounded here
# (about 5 minutes at the default timeout: room for an autoscaler to add a node); what can never fit is refused
# before the run starts (`check_resources`).
CONTROLLER_FAILURE_LIMIT = 4


def most_demanding_scaling(spec: ExperimentSpec):
    """`spec.scaling`, with each `scaling.*` field a search varies at its largest value (grid / choice values, the
    upper end of a range): every trial of the search must fit, not only the base spec's."""
    space = spec.search.space if spec.search else {}
    worst = {}
    for name in ("num_workers", "cpus_per_worker", "use_gpu"):
        dim = space.get(f"scaling.{name}")
        if dim is not None:
            values = dim.grid or dim.choice or [(dim.uniform or dim.loguniform)[1]]
            worst[name] = max(values)
    return spec.scaling.model_copy(update=worst)


def check_resources(spec: ExperimentSpec) -> None:
    """The spec's resource requests against the connected cluster's (`ray.cluster_resources()`), naming the field:
    a Train run starts only when all its workers fit at once, and a sweep's trial actor beside them."""
    total = ray.cluster_resources()
    cpus, gpus, memory = total.get("CPU", 0.0), total.get("GPU", 0.0), total.get("memory", 0.0)
    s = most_demanding_scaling(spec)
    trial_cpus = spec.search.trial_cpus if spec.search else 0.0
    problems = []
    if s.num_workers * s.cpus_per_worker + trial_cpus > cpus:
        what = f"scaling.num_workers {s.num_workers} x scaling.cpus_per_worker {s.cpus_per_worker:g}"
        what += f" + search.trial_cpus {trial_cpus:g}" if trial_cpus else ""
        problems.append(f"{what} CPUs, but the Ray cluster has {cpus:g}")
    if s.use_gpu and s.num_workers > gpus:
        problems.append(f"scaling.use_gpu with scaling.num_workers {s.num_workers}: one GPU each, but the Ray cluster "
                        f"has {gpus:g}")
    if spec.search and spec.search.trial_memory_mb * 2**20 > memory:
        problems.append(f"search.trial_memory_mb {spec.search.trial_memory_mb}, but the Ray cluster has "
                        f"{memory / 2**20:.0f} MB of memory for tasks")
    if problems:
        raise SpecError("the spec asks for more than the Ray cluster has, so its run could never start: "
                        + "; ".join(problems))


# MLflow's credential variables (`orchestrator.tracking.resolve_tracking_uri` moves a URI's credentials there).
MLFLOW_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def credentials_runtime_env() -> dict[str, Any] | None:
    """A cluster's trials log to MLflow from other machines: the driver's MLflow credentials go with the job
    as environment variables (not inside the tracking URI, which is printed and logged). Inside a Ray Jobs
    job they already are the job's (`avtune submit`), and Ray refuses the same variable twice."""
    found = {k: os.environ[k] for k in MLFLOW_CREDENTIAL_VARS if os.environ.get(k)}
    if not found or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    return {"env_vars": found}


def ensure_data(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec with absolute paths, its generated data synthesised on first use.

    Paths are resolved here, against the caller's working directory, because Tune trials and Train
    workers run in working directories of their own: a relative `runs` there would put checkpoints
    under Ray's session folder. Generated data gets its folder under the runs folder.
    """
    storage = spec.storage.model_copy(update={"runs_dir": Path(spec.storage.runs_dir).resolve()})
    data = spec.data.model_copy(update={"cache_dir": Path(spec.data.cache_dir).resolve()} if spec.data.cache_dir else {})
    if spec.data.source != "generated":
        root = Path(spec.data.root).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: dataset folder {spec.data.root} does not exist")
    else:
        root = Path(spec.data.root) if spec.data.root else storage.runs_dir / "data" / spec.data.synth.folder_key()
        root = root.resolve()
        if not (root / "card.json").exists():
            try:
                synthesize_dataset(root, layout=spec.data.layout, **spec.data.synth.model_dump())
            except FileExistsError as err:  # a folder the generator did not make: never written into
                raise SpecError(str(err)) from None
        else:
            check_generated_matches(root, spec)
    return spec.model_copy(update={"storage": storage, "data": data.model_copy(update={"root": root})})


def check_generated_matches(root: Path, spec: ExperimentSpec) -> None:
    """A generated set found at `data.root` was made with this spec's `data.synth` and `data.layout`: training on
    a set generated with other settings while the spec says otherwise would be a silent mismatch."""
    import json

    try:
        made_with = json.loads((root / "card.json").read_text()).get("params") or {}
    except (OSError, ValueError) as err:
        raise SpecError(f"data.root: {root / 'card.json'} cannot be read ({err})") from None
    wanted = {"layout": spec.data.layout, **spec.data.synth.model_dump(mode="json")}
    differ = [f"{key} {made_with[key]!r} there, {value!r} in the spec" for key, value in wanted.items()
              if key in made_with and made_with[key] != value]
    if differ:
        raise SpecError(f"data.root: {root} holds a set generated with other data.synth settings ("
                        + "; ".join(differ) + "): point data.root at a new folder, or set data.synth as it was made")


def has_start_point(section) -> bool:
    return "init_from" in type(section).model_fields


def fetch_final_checkpoint(client: MlflowClient, run_id: str, expected_method: str, runs_dir: Path) -> str:
    """The final checkpoint artifact of a finished `expected_method` run, downloaded under `runs_dir/starts`
    (shared storage on a cluster, where the Train workers read it)."""
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own RestException / MlflowException
        where = client.tracking_uri
        raise SpecError(f"method.init_from: no MLflow run {run_id} at {redact_uri(where)} "
                        f"({redact_text(str(err), where)})") from None
    method = run.data.params.get("method.name") or run.data.tags.get("avtune.method")
    if method != expected_method:
        raise SpecError(f"method.init_from: run {run_id} is a {method!r} run; it must be a finished {expected_method!r} run")
    if run.info.status != "FINISHED":
        raise SpecError(f"method.init_from: run {run_id} is {run.info.status}; start from a FINISHED {expected_method} run")
    dest = Path(runs_dir) / "starts" / run_id
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return client.download_artifacts(run_id, "checkpoints/final_model.pt", str(dest))
    except Exception as err:  # noqa: BLE001
        raise SpecError(f"method.init_from: run {run_id} has no checkpoints/final_model.pt artifact ({err})") from None


def check_start_run(client: MlflowClient, run_id: str, spec: ExperimentSpec) -> None:
    """A start run named by id (`method.init_from`) is an avtune run of this spec's experiment (or
    `method.init_from_other_experiment`) trained on this spec's data (the digest of its MLflow training dataset):
    its memory banks are per training clip, so a run of other clips would start CMA on the wrong memory."""
    from orchestrator.tracking import training_dataset

    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own RestException / MlflowException
        raise SpecError(f"method.init_from: no MLflow run {run_id} at {client.tracking_uri} ({err})") from None
    if "avtune.method" not in run.data.tags:
        raise SpecError(f"method.init_from: run {run_id} was not made by avtune (no avtune.method tag): start from an "
                        "avtune avid run, or give the path of its checkpoint")
    name = spec.tracking.experiment or spec.name
    here = client.get_experiment_by_name(name)
    if (here is None or run.info.experiment_id != here.experiment_id) and not spec.method.init_from_other_experiment:
        other = client.get_experiment(run.info.experiment_id).name
        raise SpecError(f"method.init_from: run {run_id} belongs to experiment {other!r}, not this spec's {name!r}; "
                        "set method.init_from_other_experiment: true to start from it anyway")
    ours = training_dataset(spec.data)
    theirs = [i.dataset for i in run.inputs.dataset_inputs if i.dataset.digest]
    if ours is not None and [d.digest for d in theirs] != [ours.digest]:
        trained = ", ".join(f"{d.name} (digest {d.digest})" for d in theirs) or "no logged dataset"
        raise SpecError(f"method.init_from: run {run_id} trained on {trained}, this spec's data is {ours.name} "
                        f"(digest {ours.digest}): its memory banks hold other clips")


def resolve_start_point(spec: ExperimentSpec, client: MlflowClient) -> ExperimentSpec:
    """A method that starts from a trained model (CMA from AVID) gets its start point as a checked local
    file before anything is logged: an MLflow run id becomes that run's final checkpoint."""
    m = spec.method
    if not has_start_point(m) or not m.init_from:
        return spec
    cls = get_method(m.name)
    stage = cls.start_stage(m.model_copy(update={"init_from": ""}))
    init_from, source = m.init_from, m.init_source
    if is_run_id(init_from) and not Path(init_from).exists():
        check_start_run(client, init_from, spec)
        init_from = fetch_final_checkpoint(client, init_from, stage["name"] if stage else m.name, spec.storage.runs_dir)
        source = source or f"run:{m.init_from}"
    else:
        init_from = str(Path(init_from).resolve())
    try:
        cls.check_start(init_from, spec)
    except ValueError as err:
        raise SpecError(str(err)) from None
    return spec.model_copy(update={"method": m.model_copy(update={"init_from": init_from, "init_source": source})})


def run_name_for(spec: ExperimentSpec) -> str:
    """Names that say what ran, for comparing in the MLflow UI: method, fusion, alpha and window."""
    m = spec.method
    parts = [m.name, spec.model.fusion, *get_method(m.name).run_label(m)]
    parts.append(f"s{spec.train.seed}")
    return "_".join(parts)


def config_label(spec: ExperimentSpec, searched: Iterable[str] = ()) -> str:
    """The run's settings without its seed, e.g. "ogm_ge_concat_a0.8_w0-6" plus any searched field
    outside the method ("ogm_ge_concat_a0.8_w0-6 train.learning_rate=0.01"): one configuration."""
    m = spec.method
    label = "_".join([m.name, spec.model.fusion, *get_method(m.name).run_label(m)])
    data = spec.model_dump(mode="json")
    extra = []
    for path in sorted(searched):
        if path == "method" or path.startswith("method.") or path == "train.seed":
            continue
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        extra.append(f"{path}={value}")
    return " ".join([label, *extra])


def run_tags(spec: ExperimentSpec) -> dict[str, str]:
    return {
        "avtune.method": spec.method.name,
        "avtune.fusion": spec.model.fusion,
        "avtune.dataset": spec.data.layout if spec.data.source == "dataset" else f"generated-{spec.data.layout}",
    }


def start_mlflow_run(client: MlflowClient, spec: ExperimentSpec, tags: dict[str, str] | None = None,
                     run_name: str | None = None) -> tuple[str, str]:
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment or spec.name, spec.storage.runs_dir)
    run = client.create_run(experiment_id, run_name=run_name or run_name_for(spec), tags={**run_tags(spec), **(tags or {})})
    run_id = run.info.run_id
    try:  # a run that exists is never left RUNNING by a failure while it is being described
        log_params_batched(client, run_id, logged_params(spec))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "spec.yaml").write_text(dump_spec_yaml(spec))
            client.log_artifact(run_id, str(Path(tmp) / "spec.yaml"))
        card = Path(spec.data.root) / "card.json" if spec.data.root else None
        if card and card.exists():
            client.log_artifact(run_id, str(card))
        log_training_data(client, run_id, spec.data)  # the runs table's Dataset column
    except BaseException as err:
        finish_run(client, run_id, err)
        raise
    return experiment_id, run_id


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s);
# worker-group start, every report and the shutdown wait on that poll, which dominates short trials
# (benchmarks/sweep.py measures before/after). A user's own setting wins; Ray Train forwards the
# variable from the process that builds the trainer to its controller.
FAST_POLL_INTERVAL_S = "0.2"


class WithoutUnusedHelpers:
    """A Ray Train trainer less two helper actors that avtune's runs cannot use; each costs a process per
    Train run (~1.7 CPU-s on 2 cores: its start and imports; measured with benchmarks/trial_cpu.py).

    - `DatasetsCallback` starts a `DatasetManager` actor for every run, with or without Ray Datasets.
      avtune's workers read clips with PyAV through a torch DataLoader and pass no `datasets`.
    - `PlacementGroupCleanerCallback` starts a detached `PlacementGroupCleaner` that asks the State API
      once a second whether the controller still lives. The State API needs the dashboard, which the
      embedded Ray does not start: there it can never see the controller die (and would poll until Ray
      shuts down if the controller's own stop did not reach it). Dropped on the embedded Ray only; there
      `ReleaseLeftPlacementGroups` and the trial's `abort()` release the worker group's CPUs. A cluster
      (with its dashboard) keeps it.

    `_create_default_callbacks` is Ray Train 2.60's own (private) assembly point of these callbacks;
    tests/test_training.py checks it still yields them, so an upgrade that moves them fails a test.
    """

    def _create_default_callbacks(self) -> list:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        unused = [] if self.datasets else [DatasetsCallback]
        if os.environ.get(EMBEDDED_RAY_ENV) == "1":
            unused.append(PlacementGroupCleanerCallback)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, tuple(unused))]

    def _register_sigint_handler(self, controller) -> None:
        """Ctrl-C during `fit()` in the main thread (a single `avtune train`): Ray Train 2.60's own handler waits for
        the controller's `abort()`, which a controller still waiting for its worker group (no free CPU) never
        answers, so the command went on after "Gracefully aborting" until SIGTERM. Here the abort is sent
        without waiting and the interrupt raised at once: the run ends KILLED and the command exits 130; the
        controller stops its workers by itself, and the driver's Ray (or the job, on a cluster) goes with it.
        Ray Train's own hook (private; tests/test_training.py checks it is still called)."""
        def abort_and_interrupt(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                controller.abort.remote()
            except Exception:  # noqa: BLE001 - a controller already gone needs no abort
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, abort_and_interrupt)


class ClipTrainer(WithoutUnusedHelpers, TorchTrainer):
    """Ray's TorchTrainer (torch.distributed process group over the workers, for DDP) for avtune's runs."""


class SingleWorkerTrainer(WithoutUnusedHelpers, DataParallelTrainer):
    """One CPU worker: Ray's DataParallelTrainer with the base backend, no torch.distributed process group.

    A TorchTrainer sets one up even for a single worker (a gloo group of size 1, three calls from the
    controller to the worker) and its TorchConfig, unpickled in the Train controller, imports torch there
    (~1.7 CPU-s per Train run on 2 cores). One worker needs neither: `prepare_model` and
    `prepare_data_loader` wrap nothing at world size 1 and the engine's collectives are no-ops without a
    group (workers/distributed.py). GPU runs keep the TorchTrainer (its context sets the CUDA device).
    """

    def __init__(self, train_loop_per_worker, **kwargs):
        super().__init__(train_loop_per_worker, backend_config=BackendConfig(), **kwargs)


def trainer_class(num_workers: int, use_gpu: bool) -> type:
    return SingleWorkerTrainer if num_workers == 1 and not use_gpu else ClipTrainer


def build_trainer(spec: ExperimentSpec, ray_run_name: str, callbacks: list,
                  group: dict[str, ExperimentSpec] | None = None) -> DataParallelTrainer:
    """The Train run of `spec`; with `group` ({member name: spec}, resources those of `spec`), of every member
    side by side (`workers.engine.fit_group`)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", FAST_POLL_INTERVAL_S)
    storage = (Path(spec.storage.runs_dir) / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    return trainer_class(spec.scaling.num_workers, spec.scaling.use_gpu)(
        train_loop_per_worker,
        train_loop_config=({"group": {name: s.model_dump(mode="json") for name, s in group.items()}} if group
                           else {"spec": spec.model_dump(mode="json")}),
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker, **({"GPU": 1} if spec.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=spec.train.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[*callbacks, ReleaseLeftPlacementGroups()],
        ),
    )


def log_final_artifacts(client: MlflowClient, run_id: str, checkpoint_dir: str) -> dict[str, Any]:
    """Best (by validation acc) and final weights as artifacts; returns the checkpoint's state."""
    state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"num_classes": state["num_classes"], "class_names": state["class_names"]}
        # The final file also keeps the method's own state (AVID's memory banks and Z, which CMA starts from).
        torch.save({"model": state["model"], **meta, "epoch": state["epoch"], "method_name": state.get("method_name"),
                    "method": state["method"]}, Path(tmp) / "final_model.pt")
        files = [Path(tmp) / "final_model.pt"]
        if state["best"]["state"] is not None:
            torch.save({"model": state["best"]["state"], **meta, "epoch": state["best"]["epoch"]}, Path(tmp) / "best_model.pt")
            files.append(Path(tmp) / "best_model.pt")
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path="checkpoints")
    log_predictions(client, run_id, state.get("predictions") or [])
    log_probabilities(client, run_id, state.get("probabilities"))
    return state


def log_predictions(client: MlflowClient, run_id: str, rows: list[dict[str, Any]]) -> None:
    """The run's per-clip predictions (`workers.evaluation.predict` rows) as `predictions.csv`, so any
    paired comparison can be recomputed from MLflow alone; nothing for a method without a classifier."""
    if not rows:
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv_safe(pd.DataFrame(rows, columns=PREDICTION_COLUMNS)).to_csv(Path(tmp) / PREDICTIONS_FILE, index=False)
        client.log_artifact(run_id, str(Path(tmp) / PREDICTIONS_FILE))


def log_probabilities(client: MlflowClient, run_id: str, packed: dict[str, Any] | None) -> None:
    """The joint head's softmax per clip (`workers.evaluation.pack_probabilities`) as `probabilities.npz`
    (numpy.savez_compressed: clip_id, split, model as in predictions.csv, float16 probs clips x classes),
    what the report's uni-modal ensemble averages; nothing for a method without a classifier."""
    if not packed:
        return
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(Path(tmp) / PROBABILITIES_FILE, clip_id=np.array(packed["clip_id"], dtype=str),
                            split=np.array(packed["split"], dtype=str), model=np.array(packed["model"], dtype=str),
                            probs=packed["probs"].numpy().astype(np.float16))
        client.log_artifact(run_id, str(Path(tmp) / PROBABILITIES_FILE))


def finish_train_run(client: MlflowClient, run_id: str, logger: MlflowEpochLogger, result) -> dict[str, Any]:
    """After a Train run's `fit()` returned: its final artifacts, every epoch in MLflow (the
    checkpoint's history fills what the controller-side logger could not log), the run FINISHED.
    Shared by a single training and a sweep trial. Returns the final checkpoint's state."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        return finish_from_checkpoint(client, run_id, logger, ckpt_dir)


def finish_from_checkpoint(client: MlflowClient, run_id: str, logger: MlflowEpochLogger, checkpoint_dir: str | Path) -> dict[str, Any]:
    state = log_final_artifacts(client, run_id, str(checkpoint_dir))
    if not logger.reconcile(state["history"]):
        raise RuntimeError(f"tracking server {redact_uri(logger.tracking_uri)} unreachable: some epochs could not be logged")
    finish_run(client, run_id)
    return state


def finish_group(client: MlflowClient, run_ids: dict[str, str], loggers: dict[str, MlflowEpochLogger], result) -> None:
    """`finish_train_run` for a group's Train run: each member's run from its folder of the final checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        for name, run_id in run_ids.items():
            finish_from_checkpoint(client, run_id, loggers[name], Path(ckpt_dir) / name)


def _poll_progress(client: MlflowClient, run_id: str, on_epoch: Callable[[dict[str, float]], None], stop: threading.Event) -> None:
    seen: set[int] = set()
    while True:
        finished = stop.wait(2.0)
        try:
            frame = metric_history_frame(client, run_id)
        except Exception:  # noqa: BLE001 - progress display only
            frame = None
        if frame is not None and "epoch" in frame:
            for step, row in frame.iterrows():
                if int(step) not in seen and not pd.isna(row.get("acc")):
                    seen.add(int(step))
                    on_epoch({k: v for k, v in row.items() if not pd.isna(v)})
        if finished:
            return


def run_training(spec: ExperimentSpec, address: str | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 resume_run_id: str | None = None) -> TrainingResult:
    """Train one spec under Ray Train and track it in MLflow.

    `resume_run_id` continues an interrupted run: the same MLflow run and the same Ray run
    name, so Ray Train restarts from the latest checkpoint and the logger skips logged epochs.
    """
    if get_method(spec.method.name).needs_estimation(spec.method):
        # Checked before anything is generated or logged: a single run has no estimation stage.
        raise SpecError(f"method.weights: {spec.method.name} with weights 'estimate' needs the estimation stage "
                        "that `avtune sweep` runs first (a spec with a search section, e.g. search: {compare: "
                        "[gblend]}); for a single training give method.weights {audio, visual, joint} or 'uniform'")
    if get_method(spec.method.name).start_stage(spec.method) is not None:
        raise SpecError(f"method.init_from: {spec.method.name} starts from a trained model (CMA: the model, memory "
                        "banks and Z of an avid run, as the official two-stage schedule): give the run id of a finished "
                        "avid run or the path of its checkpoints/final_model.pt, or run it as a sweep "
                        f"(search: {{compare: [{spec.method.name}]}}), which trains that stage first")
    spec = ensure_data(spec)
    tracking_uri = resolve_tracking_uri(spec.tracking.tracking_uri, spec.storage.runs_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    spec = resolve_start_point(spec, client)
    connect_ray(address)
    check_resources(spec)  # connected, and before the run exists
    if resume_run_id:
        run_id = resume_run_id
        experiment_id = client.get_run(run_id).info.experiment_id
        reopen_run(client, run_id)
    else:
        experiment_id, run_id = start_mlflow_run(client, spec)
    logger = MlflowEpochLogger(tracking_uri, run_id)
    stop = threading.Event()
    poller = None
    if on_epoch is not None:
        poller = threading.Thread(target=_poll_progress, args=(client, run_id, on_epoch, stop), daemon=True)
        poller.start()
    try:
        trainer = build_trainer(spec, f"{spec.name}-{run_id[:12]}", [logger])
        result = trainer.fit()
        state = finish_train_run(client, run_id, logger, result)
    except BaseException as err:
        stop.set()
        finish_run(client, run_id, err)
        raise
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=10)
    history = pd.DataFrame(state["history"]).set_index("epoch")
    history.index = history.index.astype(int)
    return TrainingResult(
        run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri,
        metrics=dict(state["history"][-1]), checkpoint_path=result.checkpoint.path, history=history,
    )
